"""ClassSelect: each sample's group of outputs for its own class (per-class box regression).

bottom[0] (N, C * K, ...) is read as (N, C, K); bottom[1] holds the labels (N,) as
floats, Caffe's way; top (N, K) = bottom[0][n, label[n]]. K is
class_select_param.group_size (4: a box). The paper's appendix A trains the
per-class regression (PCR) "for the ground-truth class" only: a EuclideanLoss
on this top gives the other classes' outputs no gradient. Backward writes
bottom[0]'s diff (zero outside the selected groups); the labels get none.
"""
import numpy as np

from ..backend import array_module
from .base import Layer, register


@register("ClassSelect")
class ClassSelectLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.group = self.param.class_select_param.group_size
        if self.group < 1:
            raise self.error("group_size must be at least 1")

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        n, per_sample = bottom[0].shape[0], bottom[0].count // max(1, bottom[0].shape[0])
        if per_sample % self.group:
            raise self.error(f"{per_sample} values per sample are not "
                             f"whole groups of group_size {self.group}")
        if bottom[1].count != n:
            raise self.shape_error("labels", (n,), bottom[1].shape)
        self.classes = per_sample // self.group
        top[0].reshape((n, self.group))

    def _labels(self, bottom):
        """(array module, integer labels); a label outside [0, C) raises here on NumPy, on the
        GPU when the Net next reads the loss (`Layer.deferred_check`); meanwhile it selects
        the nearest class."""
        xp = array_module(bottom[1].data)
        labels = bottom[1].data.reshape(-1).astype(np.int64)
        self.check_input((labels < 0) | (labels >= self.classes),
                         f"layer '{self.name}' (ClassSelect): a label is outside [0, {self.classes})")
        return xp, xp.clip(labels, 0, self.classes - 1)

    def forward(self, bottom, top):
        xp, labels = self._labels(bottom)
        groups = bottom[0].data.reshape(len(labels), self.classes, self.group)
        top[0].data[...] = groups[xp.arange(len(labels)), labels]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp, labels = self._labels(bottom)
        diff = xp.zeros((len(labels), self.classes, self.group), bottom[0].diff.dtype)
        diff[xp.arange(len(labels)), labels] = top[0].diff
        bottom[0].diff[...] = diff.reshape(bottom[0].shape)
