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
    arrays when the element count does not change. As in Caffe (SyncedMemory),
    memory is allocated (zeros) when first used: the data at its first access,
    in the blob's layout (`channels_last`) and dtype, which building a net and
    preparing it only record, so no activation memory exists before a forward
    or a shared slot (vggcaffe.memory) provides it; the diff in data's layout at
    its first access (blobs that never see a backward pass, as in TEST nets,
    hold no diff memory).
    """

    def __init__(self, shape=(), dtype=np.float32, xp=None):
        self._xp = xp or backend.xp()
        self.dtype = np.dtype(dtype)
        self._shape = tuple(int(d) for d in shape)
        self._data = None
        self._diff = None
        self.channels_last = False      # the data is (or will be allocated as) NHWC memory

    @property
    def data(self):
        if self._data is None:
            self._data = self._zeros(self._shape, self.dtype)
        return self._data

    @data.setter
    def data(self, value):
        self._data = value
        self._shape = tuple(value.shape)
        layout = value.ndim == 4 and is_channels_last(value)
        if not (layout and value.flags.c_contiguous):    # an array that is both says nothing
            self.channels_last = layout

    def _zeros(self, shape, dtype):
        """Zeros of `shape` and `dtype` in the blob's layout."""
        if self.channels_last and len(shape) == 4:
            n, c, h, w = shape
            return self._xp.zeros((n, h, w, c), dtype).transpose(0, 3, 1, 2)
        return self._xp.zeros(shape, dtype)

    @property
    def has_data(self):
        """True once the data array exists."""
        return self._data is not None

    @property
    def template(self):
        """What type checks read (array module, dtype, rank): the data, or while it does not
        exist an empty array of its module, dtype and rank (nothing allocated)."""
        if self._data is not None:
            return self._data
        return self._xp.empty((0,) * len(self._shape), self.dtype)

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
        return self._shape

    @property
    def count(self):
        return int(np.prod(self._shape, dtype=np.int64))

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
        if shape == self._shape:
            return
        if int(np.prod(shape, dtype=np.int64)) == self.count and self._data is not None:
            self.data = self._data.reshape(shape)
            if self._diff is not None:
                self._diff = self._diff.reshape(shape)
        else:
            self._shape, self._data, self._diff = shape, None, None

    def make_channels_last(self, keep_values=False, dtype=None):
        """Give data and diff NHWC memory (same shape; zeroed, the diff when next
        used, or with their values when `keep_values`) unless they have it; a blob
        without data only records the layout for its allocation. `dtype` changes
        the storage type too (the GPU's bf16 mode keeps some blobs as bfloat16 bits
        in uint16)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if len(self._shape) != 4:
            raise ValueError(f"make_channels_last needs a 4-D blob, not shape {self._shape}")
        if self._data is None:
            self.channels_last, self.dtype, self._diff = True, dtype, None
            return
        if not is_channels_last(self._data) or self._data.dtype != dtype:
            self.channels_last = True
            data = self._zeros(self._shape, dtype)
            diff = None
            if keep_values:
                data[...] = self._data
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
