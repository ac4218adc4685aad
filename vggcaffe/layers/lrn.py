"""LRN: local response normalisation, y = x * scale^(-beta), as Caffe.

ACROSS_CHANNELS: scale = k + alpha / n * sum of x^2 over the n channels
centred on c (zero padded), n = local_size.
WITHIN_CHANNEL:  scale = 1 + alpha / n^2 * sum of x^2 over the n x n spatial
window centred on (h, w) (zero padded; Caffe's AVE pooling with pad (n-1)/2
always divides by n^2 here). k is not used: Caffe builds this region from a
Power layer whose shift is fixed at 1.

Backward, with the window sum S(.) being symmetric (q in window(p) iff p in
window(q)):  dx = dy * scale^(-beta) - (2 alpha beta / m) * x * S(dy * y / scale),
m = n for ACROSS_CHANNELS and n^2 for WITHIN_CHANNEL.
Window sums run over the n offsets per axis (the spatial box sum is separable).
"""
from ..backend import array_module
from ..errors import VggcaffeError
from ..proto import caffe_pb2
from .base import Layer, register


def window_sum(xp, a, axis, n):
    """Sum of `a` over the n entries centred on each index along `axis`, zero padded."""
    pad = (n - 1) // 2
    shape = list(a.shape)
    size = shape[axis]
    shape[axis] = size + 2 * pad
    padded = xp.zeros(shape, a.dtype)
    index = [slice(None)] * a.ndim
    index[axis] = slice(pad, pad + size)
    padded[tuple(index)] = a
    total = None
    for offset in range(n):
        index[axis] = slice(offset, offset + size)
        view = padded[tuple(index)]
        total = view.copy() if total is None else xp.add(total, view, out=total)
    return total


@register("LRN", "LRN")
class LRNLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.lrn_param
        self.n, self.alpha, self.beta = p.local_size, p.alpha, p.beta
        if self.n % 2 != 1:
            raise VggcaffeError(f"layer '{self.name}' (LRN): local_size must be odd, got {self.n}")
        self.across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
        self.k = p.k if self.across else 1.0                        # see the module docstring
        self.window = self.n if self.across else self.n * self.n    # m in the docstring

    def reshape(self, bottom, top):
        if len(bottom[0].shape) != 4:
            raise VggcaffeError(f"layer '{self.name}' (LRN): bottom must be 4-D (N, C, H, W), "
                                f"got shape {bottom[0].shape}")
        if top[0] is bottom[0]:
            raise VggcaffeError(f"layer '{self.name}' (LRN) cannot work in place")
        top[0].reshape(bottom[0].shape)

    def _sum(self, xp, a):
        """Window sum over channels, or over the n x n spatial window."""
        if self.across:
            return window_sum(xp, a, 1, self.n)
        return window_sum(xp, window_sum(xp, a, 2, self.n), 3, self.n)

    def forward(self, bottom, top):
        x = bottom[0].data                                   # (N, C, H, W)
        xp = array_module(x)
        self.scale = self._sum(xp, x * x)
        self.scale *= x.dtype.type(self.alpha / self.window)
        self.scale += x.dtype.type(self.k)                   # (N, C, H, W)
        top[0].data[...] = x * self.scale ** x.dtype.type(-self.beta)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x, y, dy = bottom[0].data, top[0].data, top[0].diff  # all (N, C, H, W)
        xp = array_module(x)
        ratio = self._sum(xp, dy * y / self.scale)
        ratio *= x
        ratio *= x.dtype.type(2 * self.alpha * self.beta / self.window)
        bottom[0].diff[...] = dy * self.scale ** x.dtype.type(-self.beta) - ratio
