"""Time-to-accuracy of the demo: vggcaffe versus a PyTorch twin of the same net, in one run.

    python tools/bench_demo_torch.py [--solver models/demo_solver.prototxt] [--target 0.60] [--only torch|vggcaffe]

The twin is built from the same solver and train_val prototxt (layers, fillers'
kinds, lr_mult/decay_mult, batch size, augmentation: crop_pad random crops and
flips, mean and scale, the lr schedule, the test interval) and trains on the
same data/imagenette_32.npz on the CPU with all cores. vggcaffe runs as
`vggcaffe train` in a subprocess; each log line is timed on arrival. Prints the
wall time at which each first reached test top-1 >= target, and the ratios of
those times and of the whole runs.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vggcaffe.graph import filter_net  # noqa: E402
from vggcaffe.proto import caffe_pb2  # noqa: E402
from vggcaffe.prototxt import read_net, read_solver  # noqa: E402
from vggcaffe.solver import Plateau, learning_rate  # noqa: E402


def torch_layers(net_param, torch):
    """nn modules for the compute layers of `net_param` (a chain, as VGG is), plus param specs."""
    nn = torch.nn
    mods, specs, channels, flat = [], [], 3, False
    for lp in net_param.layer:
        t = lp.type
        if t == "Convolution":
            c = lp.convolution_param
            k, pad = c.kernel_size[0], (c.pad[0] if c.pad else 0)
            m = nn.Conv2d(channels, c.num_output, k, padding=pad)
            channels = c.num_output
            mods.append(m)
            specs.append((m, lp.param, c.weight_filler.type))
        elif t == "ReLU":
            mods.append(nn.ReLU(inplace=True))
        elif t == "Pooling":
            p = lp.pooling_param
            mods.append(nn.MaxPool2d(p.kernel_size, p.stride, ceil_mode=True))
        elif t == "LRN":
            p = lp.lrn_param
            mods.append(nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k))
        elif t == "InnerProduct":
            if not flat:
                mods.append(nn.Flatten())
                flat = True
            m = nn.LazyLinear(lp.inner_product_param.num_output)
            mods.append(m)
            specs.append((m, lp.param, lp.inner_product_param.weight_filler.type))
        elif t == "Dropout":
            mods.append(nn.Dropout(lp.dropout_param.dropout_ratio))
    return nn.Sequential(*mods), specs


def augment(x, rng, tp, train):
    """Caffe-order transform of a uint8 NHWC batch: pad, crop, flip, mean, scale -> float32 NCHW."""
    n, h, w, _ = x.shape
    pad = tp.crop_pad if train else 0
    crop = tp.crop_size or h
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    hp, wp = x.shape[1:3]
    if train:
        oy, ox = rng.integers(0, hp - crop + 1, n), rng.integers(0, wp - crop + 1, n)
    else:
        oy, ox = np.full(n, (hp - crop) // 2), np.full(n, (wp - crop) // 2)
    rows = oy[:, None] + np.arange(crop)
    cols = ox[:, None] + np.arange(crop)
    out = x[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if tp.mirror:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, ::-1]
    out = (out.astype(np.float32) - np.array(tp.mean_value, np.float32)) * tp.scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def run_torch(solver_path, target, log):
    import torch
    torch.set_num_threads(os.cpu_count())
    sp = read_solver(solver_path)
    net = read_net(ROOT / sp.net)
    train_p = filter_net(net, caffe_pb2.NetState(phase=caffe_pb2.TRAIN))
    test_p = filter_net(net, caffe_pb2.NetState(phase=caffe_pb2.TEST))
    tr_layer = next(lp for lp in train_p.layer if lp.type == "NpzData")
    te_layer = next(lp for lp in test_p.layer if lp.type == "NpzData")
    data = np.load(ROOT / tr_layer.npz_data_param.source, allow_pickle=False)
    xtr, ytr = data[f"x_{tr_layer.npz_data_param.split}"], data[f"y_{tr_layer.npz_data_param.split}"]
    xte, yte = data[f"x_{te_layer.npz_data_param.split}"], data[f"y_{te_layer.npz_data_param.split}"]
    torch.manual_seed(sp.random_seed)
    model, specs = torch_layers(train_p, torch)
    model(torch.zeros(1, 3, tr_layer.transform_param.crop_size, tr_layer.transform_param.crop_size))
    groups = []
    for module, params, filler in specs:
        torch.nn.init.xavier_uniform_(module.weight) if filler == "xavier" else torch.nn.init.normal_(module.weight, 0, 0.01)
        torch.nn.init.zeros_(module.bias)
        for tensor, spec in zip((module.weight, module.bias), list(params) + [caffe_pb2.ParamSpec()] * 2):
            groups.append({"params": [tensor], "lr_mult": spec.lr_mult,
                           "weight_decay": sp.weight_decay * spec.decay_mult})
    opt = torch.optim.SGD(groups, lr=sp.base_lr, momentum=sp.momentum)
    plateau = Plateau(sp.plateau_patience, sp.plateau_max_reductions, sp.plateau_threshold)
    rng, order_rng = np.random.default_rng(sp.random_seed), np.random.default_rng(sp.random_seed + 1)
    batch, test_batch = tr_layer.npz_data_param.batch_size, te_layer.npz_data_param.batch_size
    order, pos, reached = order_rng.permutation(len(xtr)), 0, None
    start = time.time()
    for it in range(sp.max_iter + 1):
        if it % sp.test_interval == 0:
            model.eval()
            correct = 0
            with torch.no_grad():
                for k in range(sp.test_iter[0]):
                    sl = slice(k * test_batch, (k + 1) * test_batch)
                    scores = model(torch.from_numpy(augment(xte[sl], rng, te_layer.transform_param, False)))
                    correct += int((scores.argmax(1).numpy() == yte[sl]).sum())
            acc = correct / (sp.test_iter[0] * test_batch)
            log(f"torch  iter {it:5d}  {time.time() - start:7.1f}s  test top-1 {acc:.4f}")
            if reached is None and acc >= target:
                reached = time.time() - start
            if sp.lr_policy == "plateau":
                plateau.observe(acc)
            model.train()
        if it == sp.max_iter:
            break
        if pos + batch > len(order):
            order, pos = order_rng.permutation(len(xtr)), 0
        idx = order[pos:pos + batch]
        pos += batch
        lr = learning_rate(sp, it, sum(it >= v for v in sp.stepvalue), plateau.reductions)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        x = torch.from_numpy(augment(xtr[idx], rng, tr_layer.transform_param, True))
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(ytr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return reached, time.time() - start


def run_vggcaffe(solver_path, target, log):
    cmd = [sys.executable, "-m", "vggcaffe.cli", "train", "--solver", str(solver_path)]
    start, reached, test_iter = time.time(), None, None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if m := re.search(r"Iteration (\d+), Testing net", line):
            test_iter = int(m.group(1))
        m = re.search(r"Test net output #\d+: accuracy = ([\d.]+)", line)
        if m:
            acc = float(m.group(1))
            log(f"vggcaffe iter {test_iter:5d}  {time.time() - start:7.1f}s  test top-1 {acc:.4f}")
            if reached is None and acc >= target:
                reached = time.time() - start
    if proc.wait() != 0:
        raise SystemExit(f"vggcaffe train failed with status {proc.returncode}")
    return reached, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", default="models/demo_solver.prototxt")
    parser.add_argument("--target", type=float, default=0.60)
    parser.add_argument("--only", choices=["torch", "vggcaffe"])
    args = parser.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = {}
    if args.only != "vggcaffe":
        results["torch"] = run_torch(ROOT / args.solver, args.target, log)
    if args.only != "torch":
        results["vggcaffe"] = run_vggcaffe(args.solver, args.target, log)
    fmt = lambda t: "not reached" if t is None else f"{t:.1f} s"  # noqa: E731
    for name, (reached, total) in results.items():
        print(f"{name:8s} time to test top-1 >= {args.target}: {fmt(reached)}   (whole run {total:.1f} s)")
    if len(results) == 2 and all(r[0] for r in results.values()):
        print(f"ratio vggcaffe/torch (time to {args.target}): {results['vggcaffe'][0] / results['torch'][0]:.2f}")
    if len(results) == 2:
        # Same iterations and tests on both sides: the speed ratio, free of where each
        # run's accuracy curve happens to cross the target.
        print(f"ratio vggcaffe/torch (whole runs): {results['vggcaffe'][1] / results['torch'][1]:.2f}")


if __name__ == "__main__":
    main()
