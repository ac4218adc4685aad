"""Softmax over one axis, and SoftmaxWithLoss (the multinomial logistic loss of
a softmax), as Caffe.

SoftmaxWithLoss: scores (N, C, ...) and labels holding N * (...) integer class
indices (shape (N,), (N, H, W), (N, 1, H, W) ...); loss = -sum log(max(p_label,
FLT_MIN)) / normalizer over non-ignored positions. The normalizer follows
loss_param.normalization: FULL (all positions), VALID (non-ignored, default),
BATCH_SIZE (N), NONE (1); at least 1. The deprecated `normalize` bool, when set
without `normalization`, means VALID (true) or BATCH_SIZE (false).
"""
import numpy as np

from ..backend import array_module
from ..errors import VggcaffeError
from ..proto import caffe_pb2
from .base import Layer, register

FLT_MIN = np.finfo(np.float32).tiny     # Caffe clamps p with FLT_MIN for float and double alike
L = caffe_pb2.LossParameter


def softmax(xp, x, axis):
    """exp(x - max) / sum exp(x - max) along `axis`."""
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def canonical_axis(layer, axis, ndim):
    if not -ndim <= axis < ndim:
        raise VggcaffeError(f"layer '{layer.name}' ({layer.type}): axis {axis} out of range "
                            f"for a {ndim}-D bottom")
    return axis % ndim


@register("Softmax", "SOFTMAX")
class SoftmaxLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self, self.param.softmax_param.axis, len(bottom[0].shape))
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data                                   # (N, C, ...) softmax over axis
        top[0].data[...] = softmax(array_module(x), x, self.axis)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y, dy = top[0].data, top[0].diff                     # same shape as the bottom
        dot = (dy * y).sum(axis=self.axis, keepdims=True)
        bottom[0].diff[...] = (dy - dot) * y


@register("SoftmaxWithLoss", "SOFTMAX_LOSS")
class SoftmaxWithLossLayer(Layer):
    exact_num_bottom = 2
    min_top = 1
    max_top = 2          # optional second top: the probabilities
    auto_top_blobs = True
    default_loss_weight = 1.0

    def layer_setup(self, bottom, top):
        p = self.param.loss_param
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None
        if p.HasField("normalize") and not p.HasField("normalization"):
            self.normalization = L.VALID if p.normalize else L.BATCH_SIZE
        else:
            self.normalization = p.normalization

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def reshape(self, bottom, top):
        scores, labels = bottom[0].shape, bottom[1].shape
        self.axis = canonical_axis(self, self.param.softmax_param.axis, len(scores))
        self.outer = int(np.prod(scores[:self.axis]))
        self.inner = int(np.prod(scores[self.axis + 1:]))
        check_labels(self, scores, labels, self.outer * self.inner)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(scores)

    def forward(self, bottom, top):
        x = bottom[0].data                                   # (N, C, ...)
        xp = array_module(x)
        self.prob = softmax(xp, x, self.axis)
        prob = self.prob.reshape(self.outer, -1, self.inner)  # (outer, C, inner)
        self.label, self.valid = read_labels(self, xp, bottom[1].data, prob.shape[1])
        p = xp.take_along_axis(prob, self.label[:, None, :], axis=1)[:, 0, :]
        log_p = xp.log(xp.maximum(p, p.dtype.type(FLT_MIN)))
        self.normalizer = self._normalizer(self.valid)
        top[0].data[...] = -(log_p * self.valid).sum() / self.normalizer
        if len(top) > 1:
            top[1].data[...] = self.prob

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise VggcaffeError(f"layer '{self.name}' (SoftmaxWithLoss) cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        xp = array_module(self.prob)
        dx = self.prob.reshape(self.outer, -1, self.inner).copy()     # (outer, C, inner)
        onehot = xp.arange(dx.shape[1]).reshape(1, -1, 1) == self.label[:, None, :]
        dx -= onehot
        dx *= self.valid[:, None, :]
        # The loss weight as a host number on the CPU, a device array on the GPU (no sync).
        weight = (top[0].diff.flat[0] if xp is np else top[0].diff.reshape(1, 1, 1)) / self.normalizer
        bottom[0].diff[...] = (dx * weight).reshape(bottom[0].shape)

    def _normalizer(self, valid):
        """Caffe's get_normalizer; the VALID count comes from the device (one sync) when
        there is an ignore_label, else it is every prediction."""
        if self.normalization == L.FULL or (self.normalization == L.VALID and self.ignore_label is None):
            n = self.outer * self.inner
        elif self.normalization == L.VALID:
            n = float(valid.sum())
        elif self.normalization == L.BATCH_SIZE:
            n = self.outer
        else:
            n = 1
        return max(1.0, n)


def check_labels(layer, scores, labels, expected, same_first_dim=True):
    """Caffe's label-count check, and (loss layers) the first-dimension check."""
    if same_first_dim and scores[:1] != labels[:1]:
        raise VggcaffeError(f"layer '{layer.name}' ({layer.type}): scores {tuple(scores)} and labels "
                            f"{tuple(labels)} must have the same first dimension")
    if int(np.prod(labels)) != expected:
        raise VggcaffeError(f"layer '{layer.name}' ({layer.type}): {int(np.prod(labels))} labels "
                            f"(shape {tuple(labels)}) for {expected} predictions of scores "
                            f"{tuple(scores)}; with axis 1 and scores (N, C, H, W) give N*H*W labels")


def read_labels(layer, xp, labels, num_classes):
    """(label, valid), both (outer, inner): integer labels (ignored ones set to 0)
    and a mask of the non-ignored ones. Labels outside [0, C) are an error: raised here on
    NumPy; on the GPU when the Net next reads the loss (`Layer.deferred_check`)."""
    label = labels.reshape(layer.outer, layer.inner).astype(np.int64)
    valid = xp.ones(label.shape, bool) if layer.ignore_label is None else label != layer.ignore_label
    outside = ((label < 0) | (label >= num_classes)) & valid
    message = (f"layer '{layer.name}' ({layer.type}): a label is outside [0, {num_classes}) "
               f"and is not the ignore_label")
    layer.check_input(outside, message)     # on the GPU such labels index class 0 meanwhile (the pass is dropped)
    return xp.where(valid & ~outside, label, 0), valid
