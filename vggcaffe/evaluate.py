"""Testing as in section 3.2 of the paper: dense, multi-crop, multi-scale, their combination and fusion.

An image is rescaled isotropically so its smaller side is Q (the test scale),
then (NCHW, the training mean subtracted and scale applied):

  dense        the fully-convolutional net (vggcaffe/surgery.py) runs on the
               whole image: one forward per scale (and per flip); its output
               map of soft-max posteriors (N, K, h, w) is averaged over space.
               With flip, the posteriors of the mirrored image are averaged in.
  multi-crop   a grid x grid set of crop-size windows (corners, centre and
               evenly between; the middle one is Caffe's centre crop) and
               their mirrors, 2 * grid^2 per scale, through the FC net; the
               posteriors of all crops of all scales are averaged. Windows that
               coincide (an image barely larger than the crop) are run once
               and counted with their multiplicity.
  multi-scale  the posteriors of several Q are averaged (both methods).
  combined     the average of the dense and multi-crop posteriors.
  fusion       the average posteriors of several models, per method.

Default Q from the training scale S (the TRAIN data layer's scale_min /
scale_max): fixed S -> {S - d, S, S + d} with d = 32 * crop / 224 rounded (the paper's
{S-32, S, S+32} at crop 224), values below the crop raised to it; jittered
[S_min, S_max] -> {S_min, (S_min + S_max) / 2, S_max}; no rescale at training
-> the images as they come. Errors are top-1 / top-5 with ties counted as
wrong (Caffe's Accuracy rule). Both nets run forward only, their intermediate
activations sharing memory (`vggcaffe.memory.share_data`), as PyTorch's
inference frees them.
"""
import re
from pathlib import Path

import numpy as np

from . import backend
from .data.sources import ListingSource, NpzSource
from .data.transforms import Transformer
from .errors import VggcaffeError
from .memory import share_data
from .net import Net
from .proto import caffe_pb2
from .prototxt import read_net, read_solver
from .surgery import deploy_from_train_val, fully_convolutional, is_deploy, load_into, net_weights

METHODS = ("dense", "multi-crop", "dense+multi-crop")


# ------------------------------------------------------------------ metrics and crops

def topk_error(probs, labels, k):
    """Fraction of samples whose class is not among the k best: wrong when k or more
    other classes score >= the true one (so ties count as wrong, as Caffe)."""
    probs, labels = np.asarray(probs), np.asarray(labels, np.int64)
    true = probs[np.arange(len(labels)), labels]
    others_ge = (probs >= true[:, None]).sum(axis=1) - 1
    return float(np.mean(others_ge >= k))


def grid_offsets(size, crop, grid):
    """`grid` window starts along a side of `size`: 0, ..., size - crop; the middle one
    (odd grid) is Caffe's centre crop (size - crop) // 2."""
    if size < crop:
        raise VggcaffeError(f"image side {size} is smaller than the crop size {crop}")
    if grid == 1:
        return np.array([(size - crop) // 2])
    return np.arange(grid) * (size - crop) // (grid - 1)


def crop_grid(height, width, crop, grid):
    """(grid * grid, 2) window offsets (row, col), row-major."""
    rows, cols = grid_offsets(height, crop, grid), grid_offsets(width, crop, grid)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)


def extract_crops(x, offsets, crop):
    """x (N, C, H, W) -> (N, 2 * len(offsets), C, crop, crop): each window, then its mirror."""
    windows = np.stack([x[:, :, r:r + crop, c:c + crop] for r, c in offsets], axis=1)   # (N, M, C, h, w)
    both = np.stack([windows, windows[..., ::-1]], axis=2)                               # (N, M, 2, C, h, w)
    return both.reshape(x.shape[0], -1, *both.shape[3:])


def default_scales(transform, crop):
    """The paper's test scales Q for a model trained with `transform` (TRAIN scale_min/max)."""
    lo, hi = transform.scale_min, transform.scale_max or transform.scale_min
    if lo == 0:
        return [None]
    if hi > lo:
        return [lo, (lo + hi) // 2, hi]
    d = round(32 * crop / 224)
    return list(dict.fromkeys(max(q, crop) for q in (lo - d, lo, lo + d)))


# ------------------------------------------------------------------ a model under test

class Model:
    """A deploy net (or the one a train_val trains) with its weights, as an FC net for
    crops and as a fully-convolutional net for dense evaluation."""

    def __init__(self, model, weights, dtype=np.float32, name=None, keep=()):
        param = read_net(model) if isinstance(model, (str, Path)) else model
        self.name = name or Path(str(weights)).stem
        self.data_source = None if is_deploy(param) else _data_source(param)
        deploy = param if is_deploy(param) else deploy_from_train_val(param)
        self.fc_net = Net(deploy, phase="TEST", weights=str(weights), dtype=dtype, source=model)
        conv_param, conv_weights = fully_convolutional(deploy, net_weights(self.fc_net))
        self.conv_net = Net(conv_param, phase="TEST", dtype=dtype)
        load_into(self.conv_net, conv_weights)
        for net in (self.fc_net, self.conv_net):    # only their outputs (and `keep`) are read
            share_data(net, keep=keep)
        data = next(lp for lp in deploy.layer if lp.type == "Input")
        self.input, self.crop = self.fc_net.inputs[0], self.fc_net.blobs[self.fc_net.inputs[0]].shape[2]
        self.output = self.fc_net.outputs[0]
        self.transform = data.transform_param
        self.scales = default_scales(self.transform, self.crop)
        self._transformers = {}

    def prepare(self, images, q):
        """Images (N, H, W, C) uint8 of one size -> (N, C, H', W'), smaller side q (None: as they are)."""
        if q not in self._transformers:
            self._transformers[q] = Transformer(whole_image_transform(self.transform, q), "TEST", self.name,
                                                self.fc_net.dtype)
        return self._transformers[q](images, np.random.default_rng(0))

    def _posteriors(self, net, x):
        out = net.forward(**{self.input: x})[self.output]
        out = backend.to_numpy(out).astype(np.float64)
        return out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2)          # (N, K)

    def dense(self, x, flip):
        """(N, K) posteriors of the score map, averaged over space (and with the mirror's)."""
        probs = self._posteriors(self.conv_net, x)
        if flip:
            probs = (probs + self._posteriors(self.conv_net, np.ascontiguousarray(x[..., ::-1]))) / 2
        return probs

    def multi_crop(self, x, grid):
        """(N, K): the mean posterior of the grid x grid windows and their mirrors; one
        forward of the N images per distinct window and flip."""
        offsets = crop_grid(x.shape[2], x.shape[3], self.crop, grid)
        unique, counts = np.unique(offsets, axis=0, return_counts=True)
        total = 0.0
        for (r, c), count in zip(unique, counts):
            window = x[:, :, r:r + self.crop, c:c + self.crop]                 # (N, C, crop, crop)
            for view in (window, window[..., ::-1]):
                total = total + count * self._posteriors(self.fc_net, np.ascontiguousarray(view))
        return total / (2 * counts.sum())


def whole_image_transform(transform, q):
    """`transform` for whole images at scale q: no crop, pad, mirror or colour shift;
    a mean_file becomes its per-channel mean (the mean image has the crop's size)."""
    from .data.image_io import load_mean
    t = caffe_pb2.TransformationParameter()
    t.CopyFrom(transform)
    for field in ("crop_size", "crop_pad", "mirror", "color_shift_std", "scale_max", "mean_file"):
        t.ClearField(field)
    t.scale_min = q or 0
    if transform.mean_file:
        t.mean_value.extend(load_mean(transform.mean_file).mean(axis=(1, 2)).tolist())
    return t


def _data_source(param):
    """(path, split or root folder, listing?) of a train_val's TEST data layer."""
    from .surgery import test_data_layer
    layer = test_data_layer(param)
    if layer is None or layer.type not in ("NpzData", "ImageData", "Data"):
        return None
    if layer.type == "NpzData":
        return layer.npz_data_param.source, layer.npz_data_param.split or "test"
    if layer.type == "Data":
        return layer.data_param.source, ""
    return layer.image_data_param.source, layer.image_data_param.root_folder


# ------------------------------------------------------------------ images and labels

class ImageSet:
    """Test images with their labels: an .npz (x_<split>, y_<split>), a Caffe listing, or an
    LMDB folder of Datums (vggcaffe/data/db.py), read in chunks."""

    def __init__(self, path, split="test", root_folder=""):
        self.path = str(path)
        if self.path.endswith(".npz"):
            self.source = NpzSource(self.path, split, 0, "test source")
        elif Path(self.path).is_dir():
            from .data.db import LmdbSource
            self.source = LmdbSource(self.path, True, "test source")
        else:
            self.source = ListingSource(self.path, root_folder, True, 0, 0, "test source")
        self.labels = np.asarray(self.source.labels[np.arange(len(self.source))], np.int64)

    def __len__(self):
        return len(self.labels)

    def check_labels(self, classes, model):
        """Raise naming the first label outside 0..classes-1 (and where it comes from)."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= classes))
        if len(bad):
            i = bad[0]
            raise VggcaffeError(f"{self.source.names([i])[0]}: label {self.labels[i]} is not one of the "
                                f"{classes} classes of {model} ({len(bad)} such label{'s' if len(bad) > 1 else ''})")

    def chunks(self, size):
        """(indices, images (n, H, W, C)) of one size at a time, `size` images at most."""
        for start in range(0, len(self), size):
            index = np.arange(start, min(start + size, len(self)))
            images = self.source.get(index)
            for shape in dict.fromkeys(im.shape for im in images):
                same = [j for j, im in enumerate(images) if im.shape == shape]
                yield index[same], np.stack([images[j] for j in same])


# ------------------------------------------------------------------ evaluation

def evaluate(models, images, scales=None, dense=True, flip=False, multi_crop=False, combine=False, grid=5,
             batch=50):
    """{model name: {method: (N, K) posteriors}}, plus "fusion" when several models are given.
    scales: one list of Q for all models, or None for each model's default. combine adds
    "dense+multi-crop" (and implies both)."""
    dense, multi_crop = dense or combine, multi_crop or combine
    methods = [m for m, on in zip(METHODS, (dense, multi_crop, combine)) if on]
    if not methods:
        raise VggcaffeError("choose --dense and/or --multi-crop")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise VggcaffeError(f"models need distinct names, got {names}")
    results = {m.name: {method: None for method in methods if method != "dense+multi-crop"} for m in models}
    for index, chunk in images.chunks(batch):
        for model in models:
            qs = scales or model.scales
            sums = dict.fromkeys(results[model.name], 0.0)
            for q in qs:
                x = model.prepare(chunk, q)
                for method in sums:
                    sums[method] = sums[method] + _one_scale(model, method, x, flip, grid)
            for method, total in sums.items():
                _store(results[model.name], method, index, total / len(qs), len(images))
    for res in results.values():
        if combine:
            res["dense+multi-crop"] = (res["dense"] + res["multi-crop"]) / 2
    if len(models) > 1:
        results["fusion"] = {method: np.mean([results[m.name][method] for m in models], axis=0)
                             for method in methods}
    return results


def _one_scale(model, method, x, flip, grid):
    return model.dense(x, flip) if method == "dense" else model.multi_crop(x, grid)


def _store(res, method, index, probs, n):
    if res[method] is None:
        res[method] = np.zeros((n, probs.shape[1]))
    res[method][index] = probs


def error_rows(results, labels):
    """[(model, method, top-1 error, top-5 error)] for every result."""
    k5 = min(5, next(iter(next(iter(results.values())).values())).shape[1])
    return [(name, method, topk_error(p, labels, 1), topk_error(p, labels, k5))
            for name, res in results.items() for method, p in res.items()]


def format_table(rows):
    width = max(len("model"), *(len(r[0]) for r in rows))
    lines = [f"{'model':<{width}}  {'method':<17}  top-1 err  top-5 err"]
    lines += [f"{name:<{width}}  {method:<17}  {100 * e1:8.2f}%  {100 * e5:8.2f}%" for name, method, e1, e5 in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ which net goes with a weights file

def infer_model(weights, search="models"):
    """The net prototxt for `weights` when --model is not given:
    1. `<weights without suffix>.prototxt` beside it (what `vggcaffe convert` writes);
    2. for a snapshot `<prefix>_iter_<N>.npz|.caffemodel`, the `net` of the one solver
       under `search` whose snapshot_prefix is <prefix>.
    Anything else (none found, or several solvers) is an error naming what was tried."""
    weights = Path(weights)
    sidecar = weights.with_suffix(".prototxt")
    if sidecar.exists():
        return str(sidecar)
    match = re.fullmatch(r"(.*)_iter_\d+", str(weights.with_suffix("")))
    found = []
    if match:
        prefix = Path(match.group(1)).resolve()
        for path in sorted(Path(search).rglob("*solver*.prototxt")):
            solver = read_solver(path)
            if solver.snapshot_prefix and Path(solver.snapshot_prefix).resolve() == prefix and solver.net:
                found.append((path, solver.net))
    if len(found) == 1:
        return found[0][1]
    tried = f"{sidecar} does not exist" + (f"; no solver under {search}/ has snapshot_prefix '{match.group(1)}'"
                                           if match and not found else "")
    if len(found) > 1:
        tried = "several solvers match: " + ", ".join(str(p) for p, _ in found)
    raise VggcaffeError(f"cannot tell which net goes with {weights} ({tried}); give --model")


# ------------------------------------------------------------------ `vggcaffe test --dense ...`

def run_test(args):
    """The evaluation branch of `vggcaffe test`: load the models, evaluate, print the table."""
    from .log import log
    if not args.weights:
        raise VggcaffeError("--dense / --multi-crop need --weights")
    specs = [(args.model, args.weights)] + [fuse_spec(s) for s in args.fuse.split(",") if s]
    models = []
    for i, (model, weights) in enumerate(specs):
        model = model or infer_model(weights)
        name = Path(weights).stem
        models.append(Model(model, weights, name=name if name not in [m.name for m in models] else f"{name}#{i}"))
    images = _test_images(args, models[0])
    for m in models:
        images.check_labels(m.fc_net.blobs[m.output].shape[1], m.name)
    scales = args.scales
    for m in models:
        qs = ", ".join("as is" if q is None else str(q) for q in scales or m.scales)
        log(f"{m.name}: crop {m.crop}, test scales Q = {qs}; {len(images)} images from {images.path}")
        if not (m.transform.mean_value or m.transform.mean_file or m.transform.HasField("scale")):
            log(f"{m.name}: its Input has no transform_param, so pixels go in as 0..255 with no mean "
                "subtracted; give the train_val as --model to use its transform")
    results = evaluate(models, images, scales, dense=args.dense or args.combine, flip=args.flip,
                       multi_crop=args.multi_crop or args.combine, combine=args.combine, grid=args.grid,
                       batch=args.batch)
    print(format_table(error_rows(results, images.labels)))


def fuse_spec(text):
    model, sep, weights = text.rpartition(":")
    if not sep or not weights:
        raise VggcaffeError(f"--fuse takes MODEL:WEIGHTS (MODEL may be empty), got {text!r}")
    return model or None, weights


def _test_images(args, model):
    source, where = args.source, None
    if not source:
        if model.data_source is None:
            raise VggcaffeError(f"give --source: the net of {model.name} names no test data")
        source, where = model.data_source
    if source.endswith(".npz"):
        return ImageSet(source, split=args.split or where or "test")
    return ImageSet(source, root_folder=args.root_folder if args.root_folder is not None else where or "")
