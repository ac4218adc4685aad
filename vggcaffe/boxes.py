"""Bounding boxes for the paper's localisation (appendix A; see vggcaffe.localize).

Box geometry as corners (xmin, ymin, xmax, ymax): IoU, areas, the regression
targets (`encode`: centre x, centre y, width, height divided by the window
size) and their inverse, and OverFeat's greedy merging; an ImageNet box folder
(`BoxSet`: boxes.tsv and <split>.txt); and the two Python layers of a box
regressor's train_val: `BoxData`, which feeds crops and their target boxes,
and `BoxAccuracy`, the fraction of predicted boxes with IoU >= 0.5.
"""
import csv
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from . import backend
from .data.image_io import load_image, read_listing
from .data.transforms import Transformer
from .errors import VggcaffeError
from .evaluate import whole_image_transform

BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


# ------------------------------------------------------------------ boxes

def iou(a, b):
    """(n, m) intersection over union of boxes a (n, 4) and b (m, 4), as (xmin, ymin, xmax, ymax)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def area(boxes):
    """(...,) areas of boxes (..., 4) as corners."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def encode(boxes, size):
    """Boxes (..., 4) as corners in a window's pixels -> (cx, cy, w, h) / size."""
    b = np.asarray(boxes, np.float64)
    return np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                     b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], axis=-1) / size


def decode(t, size):
    """The inverse of `encode`: (cx, cy, w, h) / size -> corners in the window's pixels."""
    t = np.asarray(t, np.float64) * size
    half_w, half_h = t[..., 2] / 2, t[..., 3] / 2
    return np.stack([t[..., 0] - half_w, t[..., 1] - half_h, t[..., 0] + half_w, t[..., 1] + half_h], axis=-1)


def merge_boxes(boxes, scores, merge_iou=0.5):
    """OverFeat-style greedy merging: (boxes (k, 4), scores (k,)) after merging, best first."""
    boxes, scores = [np.asarray(b, np.float64) for b in boxes], list(np.asarray(scores, np.float64))
    while len(boxes) > 1:
        overlap = iou(np.stack(boxes), np.stack(boxes))
        np.fill_diagonal(overlap, -1)
        i, j = np.unravel_index(np.argmax(overlap), overlap.shape)
        if overlap[i, j] < merge_iou:
            break
        total = scores[i] + scores[j]
        merged = (boxes[i] * scores[i] + boxes[j] * scores[j]) / total if total > 0 else (boxes[i] + boxes[j]) / 2
        for k in sorted((i, j), reverse=True):
            del boxes[k], scores[k]
        boxes.append(merged)
        scores.append(total)
    order = np.argsort(scores)[::-1]
    return np.stack(boxes)[order], np.asarray(scores)[order]


class BoxSet:
    """Images of one split of an ImageNet box folder, with their class and ground-truth boxes
    (the images are decoded when first used: counting a split reads only its listing)."""

    def __init__(self, root, split):
        root = Path(root)
        listing, table = root / f"{split}.txt", root / "boxes.tsv"
        for path in (listing, table):
            if not path.exists():
                raise VggcaffeError(f"{path}: no such file (a box folder holds boxes.tsv and <split>.txt)")
        boxes = {}
        with open(table, newline="") as f:
            for line, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
                try:
                    boxes.setdefault(row["file"], []).append([float(row[k]) for k in BOX_COLUMNS])
                except (KeyError, TypeError, ValueError):
                    raise VggcaffeError(f"{table}:{line}: expected columns file, {', '.join(BOX_COLUMNS)}") from None
        self.files, self.labels, numbers = read_listing(listing)
        for name, line in zip(self.files, numbers):
            if name not in boxes:
                raise VggcaffeError(f"{listing}:{line}: {name} has no box in {table}")
        self.boxes = [np.asarray(boxes[name], np.float64) for name in self.files]
        self.root, self.split, self._where = root, split, (str(listing), numbers)

    @cached_property
    def images(self):
        """The decoded images (H, W, 3) uint8, read at first use."""
        listing, numbers = self._where
        return [load_image(self.root / name, True, listing, line) for name, line in zip(self.files, numbers)]

    def __len__(self):
        return len(self.files)


# ------------------------------------------------------------------ the data layer

class BoxData:
    """Python data layer (`type: "Python"`, module vggcaffe.boxes, layer BoxData): tops
    data (N, C, crop, crop), box (N, 4) and, with a third top, label (N,) as floats,
    in the order data, label, box. param_str is JSON: {"source": box folder, "split":
    "train", "batch_size": 32, "shuffle": true}. transform_param gives crop_size (needed),
    scale_min / scale_max (S, jittered at TRAIN; default: the crop size), mirror, and the
    mean / scale; other transform fields are refused. Under MPI every rank draws its own
    order (the layer does not shard the data), as a Caffe Python data layer would."""

    def setup(self, bottom, top):
        try:
            p = json.loads(self.param_str or "{}")
        except json.JSONDecodeError as e:
            raise VggcaffeError(f"layer '{self.name}' (BoxData): param_str is not JSON ({e})") from None
        if not isinstance(p, dict) or "source" not in p:
            raise VggcaffeError(f"layer '{self.name}' (BoxData): param_str needs \"source\" (a box folder)")
        if len(top) not in (2, 3) or bottom:
            raise VggcaffeError(f"layer '{self.name}' (BoxData): no bottoms and tops data, [label,] box")
        t = self.layer_param.transform_param
        refused = [f for f in ("crop_pad", "color_shift_std", "mean_file", "force_gray") if t.HasField(f)]
        if not t.crop_size:
            raise VggcaffeError(f"layer '{self.name}' (BoxData): transform_param needs crop_size")
        if refused:
            raise VggcaffeError(f"layer '{self.name}' (BoxData): transform_param cannot take {', '.join(refused)}")
        self.train = self.phase == "TRAIN"
        self.crop, self.mirror = t.crop_size, t.mirror and self.train
        lo, hi = t.scale_min or self.crop, t.scale_max or t.scale_min or self.crop
        self.scales = (lo, hi) if self.train else ((lo + hi) // 2,) * 2
        self.transform = t
        self.set = BoxSet(p["source"], p.get("split", "train"))
        self.images = self.set.images               # decoded at setup: a bad file stops the net's build
        self.batch, self.shuffle = int(p.get("batch_size", 32)), bool(p.get("shuffle", self.train))
        self._transformers, self._order, self._position = {}, np.arange(0), 0
        self.reshape(bottom, top)

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, 3, self.crop, self.crop)
        top[-1].reshape(self.batch, 4)
        if len(top) == 3:
            top[1].reshape(self.batch)

    def _next_indices(self):
        out = []
        while len(out) < self.batch:
            if self._position == len(self._order):
                n = len(self.set)
                self._order = self.rng.permutation(n) if self.shuffle else np.arange(n)
                self._position = 0
            take = min(self.batch - len(out), len(self._order) - self._position)
            out.extend(self._order[self._position:self._position + take])
            self._position += take
        return out

    def rescaled(self, i, s):
        """Image i at scale s (C, H', W') and its boxes in those pixels."""
        if s not in self._transformers:
            self._transformers[s] = Transformer(whole_image_transform(self.transform, s), "TEST", self.name)
        x = self._transformers[s](self.images[i][None], self.rng)[0]
        h, w = self.images[i].shape[:2]
        fy, fx = x.shape[1] / h, x.shape[2] / w
        return x, self.set.boxes[i] * [fx, fy, fx, fy]

    def sample(self, i):
        """(crop (C, crop, crop), target (4,)) for image i."""
        s = int(self.rng.integers(self.scales[0], self.scales[1] + 1))
        x, boxes = self.rescaled(i, s)
        h, w = x.shape[1:]
        if h < self.crop or w < self.crop:
            raise VggcaffeError(f"layer '{self.name}' (BoxData): image {self.set.files[i]} at scale {s} is "
                                f"{w}x{h}, smaller than crop_size {self.crop}")
        if self.train:
            r, c = int(self.rng.integers(0, h - self.crop + 1)), int(self.rng.integers(0, w - self.crop + 1))
        else:
            r, c = (h - self.crop) // 2, (w - self.crop) // 2
        boxes = boxes - [c, r, c, r]
        box = boxes[np.argmax(area(np.clip(boxes, 0, self.crop)))]
        x = x[:, r:r + self.crop, c:c + self.crop]
        if self.mirror and self.rng.random() < 0.5:
            x, box = x[:, :, ::-1], np.array([self.crop - box[2], box[1], self.crop - box[0], box[3]])
        return x, encode(box, self.crop)

    def forward(self, bottom, top):
        index = self._next_indices()
        crops, targets = zip(*(self.sample(i) for i in index))
        xp = backend.array_module(top[0].data)
        top[0].data[...] = xp.asarray(np.stack(crops))
        top[-1].data[...] = xp.asarray(np.stack(targets))
        if len(top) == 3:
            top[1].data[...] = xp.asarray(self.set.labels[index])

    def backward(self, top, propagate_down, bottom):
        pass


class BoxAccuracy:
    """Python layer: bottoms predicted and target boxes (N, 4) as `encode` gives them ->
    the fraction whose IoU is at least param_str's {"threshold": 0.5}."""

    def setup(self, bottom, top):
        self.threshold = float(json.loads(self.param_str or "{}").get("threshold", 0.5))
        if len(bottom) != 2 or len(top) != 1:
            raise VggcaffeError(f"layer '{self.name}' (BoxAccuracy): takes bottoms predicted, target; one top")

    def reshape(self, bottom, top):
        top[0].reshape(())

    def forward(self, bottom, top):
        pred, target = (decode(backend.to_numpy(b.data).reshape(-1, 4), 1.0) for b in bottom)
        right = np.diagonal(iou(pred, target)) >= self.threshold
        top[0].data[...] = float(right.mean())

    def backward(self, top, propagate_down, bottom):
        pass
