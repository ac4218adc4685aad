"""HDF5Data: Caffe's data layer for arrays that are not images, read from HDF5 files.

    layer { name: "data" type: "HDF5Data" top: "data" top: "label"
            hdf5_data_param { source: "train_h5.txt" batch_size: 64 shuffle: true } }

`source` lists HDF5 files, one path per line; each file holds one dataset per
top, named like the top (e.g. data (N, C, H, W) and label (N,)), all with the
same N. Batches run through the rows of the files in order and wrap around to
the first file; with shuffle, the file order and the rows within each file are
permuted on every pass (seeded like the other data layers, so a solver with a
random_seed repeats, and every rank draws the same order). Values come as the
net's dtype; there is no transform_param, as in Caffe. One file's datasets are
held in memory at a time. Under MPI each global batch of batch_size x ranks
rows is split rank-strided (set_shard), as the other data layers do. h5py
reads the files (`pip install h5py`).
"""
import numpy as np

from ..backend import array_module
from ..errors import VggcaffeError
from .base import Layer, register


def _h5py():
    try:
        import h5py
    except ImportError:
        raise VggcaffeError("the HDF5Data layer reads HDF5 through h5py: pip install h5py") from None
    return h5py


@register("HDF5Data", "HDF5_DATA")
class HDF5DataLayer(Layer):
    exact_num_bottom = 0
    min_top = 1
    order_seed = 0              # set by the net before setup (the same on every rank)

    def layer_setup(self, bottom, top):
        p = self.param.hdf5_data_param
        self.batch, self.shuffle = p.batch_size, p.shuffle
        if self.batch < 1:
            raise self.error("batch_size must be at least 1")
        try:
            with open(p.source) as f:
                self.files = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise self.error(f"cannot read the file list {p.source!r} "
                             f"({e.strerror or e})") from None
        if not self.files:
            raise self.error(f"{p.source} lists no HDF5 files")
        self.tops = list(self.param.top)
        self.rank, self.size = 0, 1
        self.position = {"pass": 0, "file": 0, "row": 0}
        self._loaded = (self.files[0], self._arrays(self.files[0]))     # forward starts here without shuffle
        for blob, array in zip(top, self._loaded[1]):
            blob.reshape((self.batch,) + array.shape[1:])

    def _arrays(self, path):
        """The datasets of the tops in one file, as arrays of the net's dtype."""
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                missing = [t for t in self.tops if t not in f]
                if missing:
                    raise self.error(f"{path} has no dataset "
                                     f"{', '.join(map(repr, missing))}; it holds {', '.join(sorted(f))}")
                arrays = [np.asarray(f[t], dtype=self.dtype) for t in self.tops]
        except OSError as e:
            raise self.error(f"cannot read HDF5 file {path} ({e})") from None
        rows = {len(a) if a.ndim else 0 for a in arrays}
        if len(rows) != 1 or 0 in rows:
            raise self.error(f"the datasets of {path} have row counts "
                             f"{[len(a) if a.ndim else 0 for a in arrays]}; they need one, above 0")
        return arrays

    def set_shard(self, rank, size):
        self.rank, self.size = int(rank), int(size)

    def _order(self, n, *key):
        return (np.random.default_rng([*np.atleast_1d(self.order_seed).tolist(), *key]).permutation(n)
                if self.shuffle else np.arange(n))

    def _file(self, pass_, index):
        """(arrays, row order) of the index-th file of a pass."""
        path = self.files[self._order(len(self.files), pass_)[index]]
        if self._loaded[0] != path:
            self._loaded = (path, self._arrays(path))
        arrays = self._loaded[1]
        return arrays, self._order(len(arrays[0]), pass_, index)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        need, parts = self.batch * self.size, []
        pos = self.position
        while need:
            arrays, order = self._file(pos["pass"], pos["file"])
            take = min(need, len(order) - pos["row"])
            rows = order[pos["row"]:pos["row"] + take]
            parts.append([a[rows] for a in arrays])
            pos["row"] += take
            need -= take
            if pos["row"] == len(order):
                pos["row"], pos["file"] = 0, pos["file"] + 1
                if pos["file"] == len(self.files):
                    pos["pass"], pos["file"] = pos["pass"] + 1, 0
        for k, blob in enumerate(top):
            batch = np.concatenate([part[k] for part in parts])[self.rank::self.size]
            if batch.shape[1:] != blob.shape[1:]:
                raise self.error(f"dataset '{self.tops[k]}' has rows of shape "
                                 f"{batch.shape[1:]} in {self._loaded[0]}, but {blob.shape[1:]} in the first file")
            blob.data[...] = array_module(blob.data).asarray(batch)

    def state(self):
        return dict(self.position)

    def set_state(self, state):
        if not {"pass", "file", "row"} <= set(state) or not 0 <= int(state["file"]) < len(self.files):
            raise self.error(f"cannot resume from data state {state}")
        self.position = {k: int(state[k]) for k in ("pass", "file", "row")}
