"""PyTorch's per-layer forward/backward times for torchvision's VGG-16/19, named and
printed like `vggcaffe time`, so the two tables can be compared layer by layer.

    python tools/time_torch_layers.py [--model D|E] [--batch 64] [--precision fp32|tf32|bf16]
                                      [--iterations 5] [--device cuda|cpu]

Each convolution, max pool and fully-connected layer is timed by events recorded
in module hooks (CUDA events on the GPU, the host clock on the CPU): forward from
its pre-hook to its hook, backward from its backward pre-hook to its backward
hook. The ReLUs are made out of place (PyTorch's full backward hooks refuse
in-place ops on hooked outputs), so their time falls between the layers and
shows only in the totals; so does conv1_1's backward (its input needs no
gradient, so its backward hook fires before its weight gradient is computed). Setup as tools/bench_gpu.py: cudnn.benchmark, TF32
only in tf32, bf16 as autocast with channels_last; synthetic data, SGD step
excluded.
"""
import argparse
import sys
import time
import warnings

import numpy as np


def caffe_names(net):
    """[(Caffe layer name, module)] of torchvision's VGG: conv{b}_{i}, pool{b}, fc6-fc8."""
    import torch.nn as nn
    names, block, index = [], 1, 1
    for module in net.features:
        if isinstance(module, nn.Conv2d):
            names.append((f"conv{block}_{index}", module))
            index += 1
        elif isinstance(module, nn.MaxPool2d):
            names.append((f"pool{block}", module))
            block, index = block + 1, 1
    fcs = [m for m in net.classifier if isinstance(m, nn.Linear)]
    names += [(f"fc{6 + k}", m) for k, m in enumerate(fcs)]
    return names


class Clock:
    """Marks on the device's timeline (CUDA events) or the host's."""

    def __init__(self, cuda):
        import torch
        self.torch, self.cuda = torch, cuda

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["D", "E"], default="D")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args(argv)
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision
    cuda = args.device == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    net = {"D": torchvision.models.vgg16, "E": torchvision.models.vgg19}[args.model]().to(args.device)
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    if args.precision == "bf16":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    clock, layers = Clock(cuda), caffe_names(net)
    marks = {}

    def hook(name, key):
        def record(*_):
            marks.setdefault((name, key), []).append(clock.mark())
        return record
    for name, module in layers:
        module.register_forward_pre_hook(hook(name, "f0"))
        module.register_forward_hook(hook(name, "f1"))
        module.register_full_backward_pre_hook(hook(name, "b0"))
        module.register_full_backward_hook(hook(name, "b1"))

    def step():
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")   # conv1_1, see above
    step()                                            # cudnn.benchmark picks its algorithms here
    if cuda:
        torch.cuda.synchronize()
    marks.clear()
    start = clock.mark()
    for _ in range(args.iterations):
        net.zero_grad(set_to_none=False)
        step()
    end = clock.mark()
    if cuda:
        torch.cuda.synchronize()
    total = clock.ms(start, end) / args.iterations

    def mean_ms(name, a, b):
        pairs = list(zip(marks.get((name, a), []), marks.get((name, b), [])))
        return float(np.mean([clock.ms(s, e) for s, e in pairs])) if pairs else 0.0
    print(f"PyTorch {torch.__version__} {args.model} ({'VGG-16' if args.model == 'D' else 'VGG-19'}), "
          f"batch {args.batch}, {args.precision}, {args.device}; average time per layer:")
    forward = backward = 0.0
    for name, _ in layers:
        f, b = mean_ms(name, "f0", "f1"), mean_ms(name, "b0", "b1")
        forward, backward = forward + f, backward + b
        print(f"{name:>14}\tforward: {f:.4g} ms.\n{name:>14}\tbackward: {b:.4g} ms.")
    print(f"Sum over these layers: forward {forward:.4g} ms, backward {backward:.4g} ms")
    print(f"Average Forward-Backward: {total:.4g} ms.")
    print(f"Throughput: {args.batch * 1e3 / total:.4g} img/s (batch {args.batch})")


if __name__ == "__main__":
    sys.exit(main())
