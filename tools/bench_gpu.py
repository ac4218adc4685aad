"""Benchmark vggcaffe on the GPU against PyTorch (torchvision's vgg16/vgg19).

One run measures, for VGG-16 (D) and VGG-19 (E) at batch 64, 224x224, with
synthetic data already on the GPU, in each precision (fp32 strict, tf32,
bf16): training steps (forward, backward, SGD momentum 0.9, weight decay
5e-4, biases at 2x lr without decay, as the models' prototxts) and inference
(a forward pass: vggcaffe's deploy net, its activations sharing memory as in
its evaluation, PyTorch's model(x) under inference_mode; neither computes a
loss or accuracy), on both sides; img/s, the ratio, and peak GPU memory (the
most CuPy's pool held, from net construction through the warm-up steps and
after the timed ones / PyTorch's caching allocator's peak reserved bytes),
with where vggcaffe's goes (activations, diffs, parameters, scratch).
PyTorch runs with cudnn.benchmark; TF32 only in tf32 mode; bf16 as autocast
with channels_last (float32 master weights, like vggcaffe's bf16).
"fp32-nchw" and "fp32-nhwc" run vggcaffe's strict fp32 with its convolutions
in that layout (`vggcaffe.gpu.set_fp32_layout`), against the same PyTorch fp32 run.

    python tools/bench_gpu.py [--models D E] [--precisions fp32 tf32 bf16] [--iters 20] [--json out.json]
"""
import argparse
import gc
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _timed(step, warmup, iters, sync):
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - start) / iters


# --- vggcaffe ----------------------------------------------------------------------
def solver_param(net_param, precision):
    """The benchmarks' SGD settings (momentum 0.9, weight decay 5e-4, fixed lr) for `net_param`."""
    from vggcaffe.proto import caffe_pb2
    p = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", momentum=0.9, weight_decay=5e-4,
                                  max_iter=100000, random_seed=1701, precision=precision)
    p.net_param.CopyFrom(net_param)
    return p


def _cupy_release():
    import cupy
    from vggcaffe.gpu import cudnn_conv
    gc.collect()
    cudnn_conv.release()
    cupy.get_default_memory_pool().free_all_blocks()


def vggcaffe_run(model, precision, batch, warmup, iters, train):
    """(img/s, peak bytes, memory account) of vggcaffe; `precision` may name the fp32 layout."""
    from vggcaffe import backend, gpu
    backend.set_mode_gpu()
    backend.set_device(0)
    precision, _, layout = precision.partition("-")
    default_layout = gpu.conv_layout("fp32")
    gpu.set_fp32_layout(layout or default_layout)
    try:
        return _vggcaffe_run(model, precision, batch, warmup, iters, train)
    finally:
        gpu.set_fp32_layout(default_layout)


def _vggcaffe_run(model, precision, batch, warmup, iters, train):
    import cupy
    from vggcaffe import gpu
    from vggcaffe.memory import share_data
    from vggcaffe.net import Net
    from vggcaffe.solver import SGDSolver
    from vggcaffe.timing import fill_inputs, synthetic_net
    _cupy_release()
    pool = cupy.get_default_memory_pool()
    high = _HighWater(pool)
    cupy.cuda.set_allocator(high.malloc)          # through net construction and the warm-up steps
    param = solver_param(synthetic_net(str(ROOT / "models" / f"{model}_train_val.prototxt"), batch), precision)
    if train:
        solver = SGDSolver(param)
        net = solver.net

        def step():
            solver.forward_backward()
            solver.apply_update(0.01)
    else:
        gpu.set_precision(precision)
        deploy = synthetic_net(str(ROOT / "models" / f"{model}_deploy.prototxt"), batch)
        net = share_data(gpu.prepare_net(Net(deploy, phase="TEST", seed=1701)))  # as evaluate.Model
        for blob in net.learnable_params:    # a deploy net has no fillers: MSRA-scaled weights, zero biases
            scale = (2 / np.prod(blob.shape[1:])) ** 0.5 if len(blob.shape) > 1 else 0.0
            blob.data[...] = cupy.random.standard_normal(blob.shape, dtype=np.float32) * np.float32(scale)

        def step():
            net.forward_loss()
    fill_inputs(net)
    for _ in range(warmup):                       # autotuning happens here
        step()
    cupy.cuda.Device().synchronize()
    cupy.cuda.set_allocator(pool.malloc)          # the timed steps run without the counting hook
    seconds = _timed(step, 0, iters, cupy.cuda.Device().synchronize)
    peak = max(high.peak, pool.total_bytes())
    memory = _memory_account(net, solver.history if train else [], pool)
    memory["high_water"] = round(peak / 2**30, 2)
    del net, step
    if train:
        del solver
    _cupy_release()
    return batch / seconds, peak, memory


class _HighWater:
    """An allocator over CuPy's pool that records the most the pool ever held (PyTorch's
    max_memory_reserved counterpart; CuPy keeps no such counter)."""

    def __init__(self, pool):
        self.pool, self.peak = pool, 0

    def malloc(self, size):
        memory = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.total_bytes())
        return memory


def _memory_account(net, history, pool):
    """GiB held by each kind of array after the timed steps (each buffer counted once)."""
    from vggcaffe.gpu import cudnn_conv

    def total(arrays):
        seen = {}
        for a in arrays:
            seen[a.data.ptr] = max(seen.get(a.data.ptr, 0), a.nbytes)
        return round(sum(seen.values()) / 2**30, 2)
    params = {id(b): b for layer in net.layers for b in layer.blobs}.values()
    activations = list(net._all_blobs.values())
    scratch = [a for state in cudnn_conv._devices.values() for a in state["scratch"].values()]
    conv_buffers = [a for layer in net.layers for a in getattr(getattr(layer, "_gpu", None), "buffers", {}).values()]
    return dict(activation_data=total(b.data for b in activations),
                activation_diff=total(b.diff for b in activations if b.has_diff),
                params=total([b.data for b in params] + [b.diff for b in params] + list(history)),
                conv_scratch=total(scratch + conv_buffers),
                pool_used=round(pool.used_bytes() / 2**30, 2), pool_held=round(pool.total_bytes() / 2**30, 2))


# --- PyTorch -------------------------------------------------------------------------
def torch_model(model, precision):
    """(torchvision net on the GPU, autocast arguments, train_step(x, y)): the same SGD
    settings as the prototxts; channels_last in bf16."""
    import torch
    import torch.nn.functional as F
    import torchvision
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    net = {"D": torchvision.models.vgg16, "E": torchvision.models.vgg19}[model]().cuda()
    if precision == "bf16":
        net = net.to(memory_format=torch.channels_last)
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    weights = [p for n, p in net.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 0.02, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    return net, autocast, train_step


def torch_run(model, precision, batch, warmup, iters, train):
    import torch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    net, autocast, train_step = torch_model(model, precision)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    if precision == "bf16":
        x = x.contiguous(memory_format=torch.channels_last)
    if train:
        net.train()

        def step():
            train_step(x, y)
    else:
        net.eval()

        def step():
            with torch.inference_mode(), torch.autocast(**autocast):
                net(x)
    seconds = _timed(step, warmup, iters, torch.cuda.synchronize)
    peak = torch.cuda.max_memory_reserved()
    del net, train_step, x, y, step
    gc.collect()
    torch.cuda.empty_cache()
    return batch / seconds, peak


# --- driver ----------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["D", "E"], choices=["D", "E"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"],
                    choices=["fp32", "fp32-nhwc", "fp32-nchw", "tf32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    import cupy
    rows, torch_runs = [], {}
    for model in args.models:
        for mode in args.modes:
            for precision in args.precisions:
                run = (model, precision, args.batch, args.warmup, args.iters, mode == "train")
                ours, our_mem, account = vggcaffe_run(*run)
                peer = (model, precision.split("-")[0], mode)        # fp32-nchw is timed against fp32
                if peer not in torch_runs:
                    torch_runs[peer] = (None, None) if args.skip_torch else torch_run(*((peer[0], peer[1]) + run[2:]))
                theirs, their_mem = torch_runs[peer]
                rows.append(dict(model=model, mode=mode, precision=precision, vggcaffe_img_s=ours,
                                 torch_img_s=theirs, vggcaffe_peak_bytes=our_mem, torch_peak_bytes=their_mem,
                                 vggcaffe_memory_gib=account))
                print(_row(rows[-1]), flush=True)
                print(f"  vggcaffe memory (GiB): {account}", flush=True)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    meta = dict(date=str(date.today()), device=props["name"].decode(), python=platform.python_version(),
                cupy=cupy.__version__, batch=args.batch, iters=args.iters, warmup=args.warmup,
                command="python tools/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    try:
        import cudnn
        import torch
        meta.update(cudnn_frontend=cudnn.__version__, cudnn=cudnn.backend_version(), torch=torch.__version__)
    except ImportError:
        pass
    from vggcaffe.gpu import conv
    meta["cudnn_fallbacks"] = sorted({f"{k[0]} {k[1]}: config {v}" for k, v in conv._choices.items() if v})
    meta["cudnn_autotune"] = _autotune_summary()
    meta["small_c_conv_ms"] = {f"{k[0]} {k[1]} {k[-1]} {np.dtype(k[-2]).name}": v for k, v in conv.direct_timings.items()}
    print(json.dumps(meta))
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


def _autotune_summary():
    """Per precision and layout: graphs tuned, how many left the heuristic's first plan, and
    the summed ms of one run of every tuned graph with the heuristic's plan vs the chosen one."""
    from vggcaffe.gpu import cudnn_conv
    summary = {}
    for key, plan in cudnn_conv._graphs.items():
        if plan.timings:
            first = min(plan.timings)
            row = summary.setdefault(f"{key[-1]}-{key[-2]}", dict(graphs=0, changed=0, heuristic_ms=0.0, tuned_ms=0.0))
            row["graphs"] += 1
            row["changed"] += plan.index != first
            row["heuristic_ms"] = round(row["heuristic_ms"] + plan.timings[first], 3)
            row["tuned_ms"] = round(row["tuned_ms"] + plan.timings[plan.index], 3)
    return summary


def _gib(n):
    return f"{n / 2**30:.1f}" if n else "-"


def _row(r):
    ratio = f"{r['vggcaffe_img_s'] / r['torch_img_s']:.2f}" if r["torch_img_s"] else "-"
    theirs = f"{r['torch_img_s']:.0f}" if r["torch_img_s"] else "-"
    return (f"| {r['model']} | {r['mode']} | {r['precision']} | {r['vggcaffe_img_s']:.0f} | {theirs} | {ratio} | "
            f"{_gib(r['vggcaffe_peak_bytes'])} | {_gib(r['torch_peak_bytes'])} |")


def _table(rows):
    head = ("| model | mode | precision | vggcaffe img/s | PyTorch img/s | ratio | vggcaffe peak GiB | "
            "PyTorch peak GiB |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(r) for r in rows])


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
