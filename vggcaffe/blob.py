"""Blob: a data array and its gradient (diff), with Caffe's logical NCHW shape.

A 4-D blob's arrays may be channels-last: (N, C, H, W)-shaped views of NHWC
memory, which convolutions and pools that work in NHWC read and write without
transposing (`Blob.make_channels_last`, set up by the layers that produce them;
an NHWC convolution's weights are (Cout, C, kh, kw) views of (Cout, kh, kw, C)).
"""
import numpy as np

from . import backend


class Blob:
    """Holds `data` and `diff`, two arrays of one shape and dtype.

    As in pycaffe, `blob.data[...] = x` writes in place; `reshape` keeps the
    arrays when the element count does not change. The diff is allocated (zeros,
    data's layout) when first used, so blobs that never see a backward pass, as
    in TEST nets, hold no diff memory.
    """

    def __init__(self, shape=(), dtype=np.float32, xp=None):
        self._xp = xp or backend.xp()
        self.dtype = np.dtype(dtype)
        self.data = self._xp.zeros(tuple(int(d) for d in shape), self.dtype)
        self._diff = None

    @property
    def diff(self):
        if self._diff is None:
            self._diff = self._zeros_like_data()
        return self._diff

    @diff.setter
    def diff(self, value):
        self._diff = value

    @property
    def has_diff(self):
        """True once the diff array exists."""
        return self._diff is not None

    @property
    def shape(self):
        return self.data.shape

    @property
    def count(self):
        return int(self.data.size)

    @property
    def num(self):
        return self.shape[0]

    @property
    def channels(self):
        return self.shape[1]

    @property
    def height(self):
        return self.shape[2]

    @property
    def width(self):
        return self.shape[3]

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(int(d) for d in shape)
        if shape == self.data.shape:
            return
        if int(np.prod(shape, dtype=np.int64)) == self.data.size:
            self.data = self.data.reshape(shape)
            if self._diff is not None:
                self._diff = self._diff.reshape(shape)
        else:
            self.data = self._xp.zeros(shape, self.dtype)
            self._diff = None

    def make_channels_last(self, keep_values=False, dtype=None):
        """Give data and diff NHWC memory (same shape; zeroed, the diff when next
        used, or with their values when `keep_values`) unless they have it. `dtype`
        changes the storage type too (the GPU's bf16 mode keeps some blobs as
        bfloat16 bits in uint16)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if not is_channels_last(self.data) or self.data.dtype != dtype:
            n, c, h, w = self.shape
            data = self._xp.zeros((n, h, w, c), dtype).transpose(0, 3, 1, 2)
            diff = None
            if keep_values:
                data[...] = self.data
                if self._diff is not None:
                    diff = self._zeros_like_data(data)
                    diff[...] = self._diff
            self.data, self._diff, self.dtype = data, diff, dtype

    def _zeros_like_data(self, data=None):
        """Zeros of data's shape, dtype and layout (channels-last or C order)."""
        data = self.data if data is None else data
        if is_channels_last(data) and not data.flags.c_contiguous:
            n, c, h, w = data.shape
            return self._xp.zeros((n, h, w, c), data.dtype).transpose(0, 3, 1, 2)
        return self._xp.zeros(data.shape, data.dtype)

    def share_data(self, other):
        """Use `other`'s data array (same memory)."""
        self.data = other.data

    def share_diff(self, other):
        self.diff = other.diff

    def __repr__(self):
        return f"Blob(shape={self.shape}, dtype={self.dtype})"


def is_channels_last(a):
    """a (N, C, H, W) is an NHWC-strided view of contiguous memory."""
    if a.ndim != 4:
        return False
    n, c, h, w = a.shape
    item = a.itemsize
    return a.strides == (c * h * w * item, item, c * w * item, c * item) or (c == 1 and a.flags.c_contiguous)
