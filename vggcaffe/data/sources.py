"""Where samples come from (an npz file, a Caffe image listing) and in what order.

A source gives len(), labels (int64, one per sample), first_shape() and
get(indices) -> images (an (N, H, W, C) uint8 array, or a list of (H, W, C)
uint8 arrays when sizes may differ) plus names(indices) for error messages.
BatchOrder decides which indices each batch holds.
"""
import zipfile

import numpy as np

from ..errors import VggcaffeError
from .image_io import load_image, read_listing, resize


def _seed_words(seed):
    """An int or a sequence of ints -> a list of ints (SeedSequence entropy)."""
    return [int(seed)] if np.ndim(seed) == 0 else [int(v) for v in seed]


class BatchOrder:
    """The indices of each batch: one order shared by all ranks, consumed in global batches.

    Epoch e walks np.random.default_rng([*seed, e]).permutation(n) when
    shuffle, else 0..n-1, and positions run on into the next epoch (Caffe wraps
    around at the end). Each call to next() consumes batch_size * size
    consecutive positions (the global batch); rank r keeps positions r::size of
    it. So ranks with the same seed are disjoint, their union is the global
    batch, and (epoch, position) is the whole state of the order. (A global
    batch that straddles two epochs may hold a sample from each, as in Caffe.)
    """

    def __init__(self, n, batch_size, shuffle, seed, rank=0, size=1):
        if n < 1:
            raise VggcaffeError("a data source with no samples has no batches")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, _seed_words(seed)
        self.rank, self.size = rank, size
        self.epoch, self.position = 0, 0
        self._cached = (None, None)

    @staticmethod
    def skip(seed, rand_skip):
        """Caffe's rand_skip: start at a random position in [0, rand_skip), the same on all ranks."""
        return int(np.random.default_rng([*_seed_words(seed), 2**32]).integers(rand_skip)) if rand_skip else 0

    def seek(self, epoch, position):
        self.epoch, self.position = int(epoch), int(position)

    def epoch_order(self, epoch):
        if self._cached[0] != epoch:
            order = np.random.default_rng([*self.seed, epoch]).permutation(self.n) if self.shuffle \
                else np.arange(self.n)
            self._cached = (epoch, order)
        return self._cached[1]

    def next(self):
        """This rank's indices (batch_size,) of the next global batch."""
        need, parts = self.batch_size * self.size, []
        while need:
            take = min(need, self.n - self.position)
            parts.append(self.epoch_order(self.epoch)[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)[self.rank::self.size]


def read_npz(path, keys, who):
    """The arrays under `keys` of an .npz archive, read without pickle; errors start with `who`."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise VggcaffeError(f"{who}: npz source {path} is not an .npz archive")
        with f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise VggcaffeError(f"{who}: {path} has no {' and '.join(map(repr, missing))}; "
                                    f"available keys: {', '.join(sorted(f.files))}")
            return tuple(f[k] for k in keys)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VggcaffeError(f"{who}: cannot read npz source {path}: {e or 'empty file'}") from None


class NpzSource:
    """uint8 images (N, H, W, C) and labels (N,) under keys x_<split> / y_<split>, read without pickle."""

    def __init__(self, path, split, limit, layer):
        self.path, self.split = path, split
        x, y = read_npz(path, (f"x_{split}", f"y_{split}"), f"layer '{layer}'")
        if x.ndim != 4 or x.dtype != np.uint8 or x.shape[3] not in (1, 3):
            raise VggcaffeError(f"layer '{layer}': {path}[x_{split}] is {x.dtype} {x.shape}, "
                                "expected uint8 (N, H, W, 1 or 3)")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise VggcaffeError(f"layer '{layer}': {path}[y_{split}] is {y.dtype} {y.shape}, "
                                f"expected integer ({len(x)},)")
        self.images, self.labels = (x[:limit], y[:limit]) if limit else (x, y)
        if not len(self.images):
            raise VggcaffeError(f"layer '{layer}': {path}[x_{split}] holds no images")

    def __len__(self):
        return len(self.images)

    def first_shape(self):
        return self.images.shape[1:]

    def get(self, indices, map_fn=map):
        return self.images[indices]

    def names(self, indices):
        return [f"{self.path}[x_{self.split}][{i}]" for i in indices]


class ListingSource:
    """Image files from a Caffe listing ("path label" per line), decoded on demand,
    optionally resized to new_height x new_width (Caffe's ImageData)."""

    def __init__(self, source, root_folder, is_color, new_height, new_width, layer):
        if bool(new_height) != bool(new_width):
            raise VggcaffeError(f"layer '{layer}': set both new_height and new_width, or neither")
        self.source, self.is_color, self.new_size = source, is_color, (new_height, new_width)
        self.paths, self.labels, self.lines = read_listing(source, root_folder)

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        img = load_image(self.paths[i], self.is_color, self.source, self.lines[i])
        return resize(img, *self.new_size) if self.new_size[0] else img

    def first_shape(self):
        return self.load(0).shape

    def get(self, indices, map_fn=map):
        return list(map_fn(self.load, indices))

    def names(self, indices):
        return [f"{self.paths[i]} ({self.source}:{self.lines[i]})" for i in indices]
