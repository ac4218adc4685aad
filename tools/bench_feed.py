"""Benchmark training from host data on the GPU: does the data pipeline keep the GPU fed?

VGG-16 (D) training steps at batch 64 whose images come from the host, made by
the data layer's pipeline (random 224 crops of 256x256 uint8 images, flips,
the PCA colour shift, mean subtraction; `--jitter` adds the paper's scale
jittering S in [256, 512], a Pillow rescale per image), against:
- the same steps with the images already on the GPU (Input layers: what
  tools/bench_gpu.py times), the bound a fed GPU reaches;
- the same data layer with its GPU feed off (VGGCAFFE_GPU_FEED=0: forward
  uploads each batch with cupy.asarray from pageable memory);
- PyTorch: torchvision's vgg16 fed by a DataLoader over the same array (the
  same transforms in NumPy per image, `--workers` processes, pin_memory,
  non_blocking copies), in the same precision.
The images are random (their content does not change the speed); the npz is
written to a temporary folder. Before timing, PyTorch's workers may have up to
2 x workers batches made and vggcaffe's prefetch thread 4, so the default times
100 steps, where that head start is small.

    python tools/bench_feed.py [--precisions fp32 tf32 bf16] [--iters 100] [--workers 8] [--jitter]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MEAN = (123.68, 116.779, 103.939)
EIGVAL = (55.46, 4.794, 1.148)
EIGVEC = (-0.5675, 0.7192, 0.4009, -0.5808, -0.0045, -0.814, -0.5836, -0.6948, 0.4203)


def write_images(folder, count, size=256, seed=0):
    rng = np.random.default_rng(seed)
    path = Path(folder) / "images.npz"
    np.savez(path, x_train=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
             y_train=rng.integers(0, 1000, count))
    return path


def transform_text(jitter):
    return ("mirror: true crop_size: 224 color_shift_std: 0.1 "
            + ("scale_min: 256 scale_max: 512 " if jitter else "")
            + " ".join(f"mean_value: {v}" for v in MEAN) + " "
            + " ".join(f"pca_eigval: {v}" for v in EIGVAL) + " "
            + " ".join(f"pca_eigvec: {v}" for v in EIGVEC))


def solver_param(npz, batch, precision, jitter, synthetic):
    """D's train net with its TRAIN data layer reading `npz` (or an Input layer)."""
    from google.protobuf import text_format
    from vggcaffe.prototxt import read_net
    from vggcaffe.proto import caffe_pb2
    from vggcaffe.timing import synthetic_net
    net = read_net(str(ROOT / "models" / "D_train_val.prototxt"))
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    for layer in net.layer:
        if layer.type == "ImageData" and any(rule.phase == caffe_pb2.TEST for rule in layer.include):
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        if layer.type == "ImageData":
            new.type = "NpzData"
            new.ClearField("image_data_param")
            new.ClearField("transform_param")
            text_format.Parse(transform_text(jitter), new.transform_param)
            new.npz_data_param.source, new.npz_data_param.batch_size = str(npz), batch
            new.npz_data_param.shuffle = True
    from bench_gpu import solver_param as sgd_settings
    return sgd_settings(synthetic_net(out, batch) if synthetic else out, precision)


def vggcaffe_run(npz, batch, precision, jitter, warmup, iters, how):
    """img/s of `how`: "synthetic" (Input layers), "feed" or "no feed" (NpzData)."""
    import cupy
    from bench_gpu import _cupy_release, _timed
    from vggcaffe import backend
    from vggcaffe.solver import SGDSolver
    from vggcaffe.timing import fill_inputs
    backend.set_mode_gpu()
    backend.set_device(0)
    os.environ["VGGCAFFE_GPU_FEED"] = "0" if how == "no feed" else "1"
    solver = SGDSolver(solver_param(npz, batch, precision, jitter, how == "synthetic"))
    fill_inputs(solver.net)

    def step():
        solver.forward_backward()
        solver.apply_update(0.01)
    seconds = _timed(step, warmup, iters, cupy.cuda.Device().synchronize)
    for layer in solver.net.layers:
        if hasattr(layer, "close"):
            layer.close()
    del solver, step
    _cupy_release()
    return batch / seconds


class _Images:
    """The torch Dataset: one image, transformed as vggcaffe's TRAIN transform does."""

    def __init__(self, npz, jitter):
        with np.load(npz) as f:
            self.x, self.y = f["x_train"], f["y_train"]
        self.jitter = jitter
        self.mean = np.array(MEAN, np.float32)[:, None, None]
        self.pca = np.array(EIGVAL) * np.array(EIGVEC).reshape(3, 3)    # eigvec[:, i] * eigval[i]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import torch
        from PIL import Image
        rng = np.random.default_rng()
        img = self.x[i]
        if self.jitter:
            s = int(rng.integers(256, 513))
            img = np.asarray(Image.fromarray(img).resize((s, s), Image.BICUBIC))
        r, c = rng.integers(0, img.shape[0] - 223), rng.integers(0, img.shape[1] - 223)
        crop = img[r:r + 224, c:c + 224]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x = crop.transpose(2, 0, 1).astype(np.float32)
        x += (self.pca @ rng.normal(0, 0.1, 3)).astype(np.float32)[:, None, None]
        x -= self.mean
        return torch.from_numpy(x), int(self.y[i])


def torch_run(npz, batch, precision, jitter, warmup, iters, workers):
    import torch
    from bench_gpu import _timed, torch_model
    net, _, train_step = torch_model("D", precision)
    net.train()
    images = _Images(npz, jitter)                 # drawn with replacement, endlessly: no epoch restarts
    sampler = torch.utils.data.RandomSampler(images, replacement=True, num_samples=batch * (warmup + iters + 100))
    loader = torch.utils.data.DataLoader(images, batch_size=batch, sampler=sampler, drop_last=True,
                                         num_workers=workers, pin_memory=True)
    batches = iter(loader)

    def step():
        x, y = next(batches)
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        if precision == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(x, y)
    seconds = _timed(step, warmup, iters, torch.cuda.synchronize)
    del loader, batches, net, train_step
    torch.cuda.empty_cache()
    return batch / seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--workers", type=int, default=8, help="PyTorch DataLoader worker processes")
    ap.add_argument("--jitter", action="store_true", help="scale jittering S in [256, 512] (a rescale per image)")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args(argv)
    from vggcaffe.layers.data import BaseDataLayer
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, vggcaffe decode/transform threads "
          f"{BaseDataLayer.workers}, torch workers {args.workers}, batch {args.batch}, "
          f"jitter {args.jitter}, command: python tools/bench_feed.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| precision | on GPU (Input) img/s | NpzData + feed | NpzData, feed off | PyTorch DataLoader | "
          "feed / on GPU | feed / PyTorch |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        npz = write_images(folder, args.images)
        run = (npz, args.batch)
        for precision in args.precisions:
            times = {how: vggcaffe_run(*run, precision, args.jitter, args.warmup, args.iters, how)
                     for how in ("synthetic", "feed", "no feed")}
            theirs = None if args.skip_torch else torch_run(*run, precision, args.jitter, args.warmup, args.iters,
                                                            args.workers)
            ratio, theirs = (f"{times['feed'] / theirs:.2f}", f"{theirs:.0f}") if theirs else ("-", "-")
            print(f"| {precision} | {times['synthetic']:.0f} | {times['feed']:.0f} | {times['no feed']:.0f} | "
                  f"{theirs} | {times['feed'] / times['synthetic']:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
