"""Layers whose tops come from outside the net or are made up, and Split.

Input: net inputs fed from outside (deploy nets). MemoryData: batches cut from
arrays handed in with Net.set_input_arrays (pycaffe's), wrapping around.
DummyData: tops of given shapes filled by fillers (constant ones once, random
ones at every forward, as Caffe's), for timing and tests. Split is never
written in a prototxt: the net inserts it where a blob has more than one
consumer, so each consumer gets its own diff and backward sums them.
"""
import numpy as np

from ..backend import array_module
from ..errors import VggcaffeError
from ..fillers import fill
from ..proto import caffe_pb2
from .base import Layer, register


@register("Input")
class InputLayer(Layer):
    exact_num_bottom = 0
    min_top = 1

    def layer_setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (1, len(top)):
            raise VggcaffeError(f"layer '{self.name}' (Input) gives {len(shapes)} shapes for {len(top)} tops; "
                                f"give 1 or {len(top)}")
        for i, blob in enumerate(top):
            blob.reshape(_dims(self, shapes[0 if len(shapes) == 1 else i].dim, self.param.top[i]))

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass


def _dims(layer, dims, top):
    """A top's shape from a prototxt, refused with a negative dimension."""
    dims = tuple(dims)
    if any(d < 0 for d in dims):
        raise layer.error(f"shape {dims} of top '{top}' has a negative dimension")
    return dims


@register("DummyData", "DUMMY_DATA")
class DummyDataLayer(Layer):
    exact_num_bottom = 0
    min_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.dummy_data_param
        shapes = [tuple(s.dim) for s in p.shape] or self._legacy_shapes(p, len(top))
        if len(shapes) == 1:
            shapes = shapes * len(top)                           # one shape for every top, as Caffe allows
        if len(shapes) != len(top):
            raise VggcaffeError(f"layer '{self.name}' (DummyData) gives {len(shapes)} shapes for {len(top)} tops")
        fillers = list(p.data_filler) or [caffe_pb2.FillerParameter(type="constant", value=0)]
        if len(fillers) not in (1, len(top)):
            raise VggcaffeError(f"layer '{self.name}' (DummyData) gives {len(fillers)} data_filler for "
                                f"{len(top)} tops; give 1 or {len(top)}")
        self.fillers = [fillers[0 if len(fillers) == 1 else i] for i in range(len(top))]
        for blob, shape, name, filler in zip(top, shapes, self.param.top, self.fillers):
            blob.reshape(_dims(self, shape, name))
            fill(blob, filler, self.rng)

    def _legacy_shapes(self, p, n):
        fields = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if not any(fields):
            return []
        if any(len(f) not in (1, n) for f in fields):
            raise self.error(f"num, channels, height and width need 1 or {n} values each")
        return [tuple(f[0 if len(f) == 1 else i] for f in fields) for i in range(n)]

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for blob, filler in zip(top, self.fillers):
            if filler.type != "constant":
                fill(blob, filler, self.rng)


@register("MemoryData", "MEMORY_DATA")
class MemoryDataLayer(Layer):
    exact_num_bottom = 0
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        p = self.param.memory_data_param
        self.batch = p.batch_size
        if self.batch < 1:
            raise self.error("batch_size must be at least 1")
        self.shape = (self.batch, p.channels, p.height, p.width)
        self.data = self.labels = None
        self.position = 0
        top[0].reshape(self.shape)
        top[1].reshape(self.batch)

    def set_arrays(self, data, labels):
        """pycaffe's set_input_arrays: data (N, C, H, W), labels (N,), N a multiple of batch_size."""
        data, labels = np.asarray(data), np.asarray(labels)
        if labels.ndim > 1 and labels.size == len(labels):
            labels = labels.reshape(len(labels))                 # pycaffe's (N, 1, 1, 1) labels
        if data.shape[1:] != self.shape[1:] or labels.shape != data.shape[:1]:
            raise self.error(f"arrays of shape {data.shape} and labels "
                             f"{labels.shape}; the layer takes (N, {', '.join(map(str, self.shape[1:]))}) and (N,)")
        if len(data) == 0 or len(data) % self.batch:
            raise self.error(f"{len(data)} samples is not a positive multiple of batch_size {self.batch}")
        self.data, self.labels, self.position = data, labels, 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        if self.data is None:
            raise VggcaffeError(f"layer '{self.name}' (MemoryData) has no data: call net.set_input_arrays first")
        xp = array_module(top[0].data)
        end = self.position + self.batch
        top[0].data[...] = xp.asarray(self.data[self.position:end])
        top[1].data[...] = xp.asarray(self.labels[self.position:end])
        self.position = end % len(self.data)


@register("Split", "SPLIT")
class SplitLayer(Layer):
    exact_num_bottom = 1
    min_top = 1

    def reshape(self, bottom, top):
        # Every top shares the bottom's data (once it exists: forward makes sure); each
        # keeps its own diff.
        for blob in top:
            if blob.shape != bottom[0].shape:
                blob.reshape(bottom[0].shape)
            if bottom[0].has_data:
                blob.data = bottom[0].data

    def forward(self, bottom, top):
        for blob in top:
            blob.data = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        diff[...] = top[0].diff
        for blob in top[1:]:
            diff += blob.diff

