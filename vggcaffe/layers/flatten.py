"""Flatten layer: merge the axes from `axis` to `end_axis` (inclusive) into one.

(N, C, H, W) with the defaults (axis 1, end_axis -1) becomes (N, C·H·W).
Forward copies the data reshaped; backward copies the diff reshaped back.
"""
import numpy as np

from .base import Layer, register


@register("Flatten", "FLATTEN")
class FlattenLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("cannot run in place (top and bottom are the same blob)")

    def reshape(self, bottom, top):
        shape = tuple(bottom[0].shape)
        p = self.param.flatten_param
        for axis in (p.axis, p.end_axis):
            if not -len(shape) <= axis < len(shape):
                raise self.error(f"axis {axis} is out of range for a bottom of shape {shape}")
        start, end = p.axis % len(shape), p.end_axis % len(shape)
        if end < start:
            raise self.error(f"end_axis ({p.end_axis}) comes before axis ({p.axis}) for shape {shape}")
        merged = int(np.prod(shape[start:end + 1], dtype=np.int64))
        top[0].reshape(shape[:start] + (merged,) + shape[end + 1:])

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.reshape(top[0].shape)       # (N, C, H, W) -> (N, C·H·W)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)  # (N, C·H·W) -> (N, C, H, W)
