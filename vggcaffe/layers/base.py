"""The Layer base class and the type registry ("Convolution" -> class).

Caffe's contract, kept here:
  setup(bottom, top)      layer_setup (read params, create and fill self.blobs)
                          then reshape (shape tops from bottoms)
  forward(bottom, top)    fills top[i].data
  backward(top, propagate_down, bottom)
                          WRITES bottom[i].diff where propagate_down[i] (the
                          net gives every consumer its own diff, so no layer
                          accumulates into a bottom), and ADDS to
                          self.blobs[j].diff where self.param_propagate_down[j]
                          (the solver zeroes param diffs each iteration).
A loss layer's top diff holds its loss weight (the net fills it), so
backward scales by top[0].diff.flat[0].
Blobs are logical NCHW; dtype follows the bottoms (float32 or float64).
"""
import numpy as np

from ..backend import array_module
from ..errors import VggcaffeError

LAYER_TYPES = {}
V1_TYPE_NAMES = {}
_ONES = {}


def add_sums(a, out, axis):
    """out += a.sum(axis) for a 2-D array. On NumPy as a GEMV with a vector of ones,
    as Caffe's bias gradients use its bias_multiplier: BLAS runs it on all cores, about
    3× faster than NumPy's one-core summing reduction on a convolution's dY."""
    if array_module(a) is not np:
        out += a.sum(axis=axis)
        return
    n, key = a.shape[axis], a.dtype.str
    if key not in _ONES or _ONES[key].size < n:
        _ONES[key] = np.ones(n, a.dtype)
    ones = _ONES[key][:n]
    out += np.matmul(ones, a) if axis == 0 else np.matmul(a, ones)


def register(type_name, v1_name=None):
    """Class decorator: make `type_name` (and its V1 enum name) build this class."""
    def wrap(cls):
        cls.type = type_name
        LAYER_TYPES[type_name] = cls
        if v1_name:
            V1_TYPE_NAMES[v1_name] = type_name
        return cls
    return wrap


class Layer:
    type = None
    # Blob-count contract; None = no constraint.
    exact_num_bottom = None
    min_bottom = None
    max_bottom = None
    exact_num_top = None
    min_top = None
    max_top = None
    # Loss layers make their top even when the prototxt lists none, and weigh it 1.
    auto_top_blobs = False
    default_loss_weight = 0.0
    # A check of this forward's inputs whose answer is on the device: (flag, message), raised
    # as a VggcaffeError when the flag holds. The Net reads it once the host reads the loss
    # anyway, so checking does not make the host wait for the device in the middle of a pass.
    deferred_check = None

    def __init__(self, param, phase="TEST", dtype=np.float32, rng=None):
        self.param = param
        self.name = param.name
        self.phase = phase
        self.dtype = np.dtype(dtype)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.blobs = []
        self.param_propagate_down = []

    # --- contract -----------------------------------------------------
    def check_blob_counts(self, bottom, top):
        def check(what, n, exact, lo, hi):
            if exact is not None and n != exact:
                raise VggcaffeError(f"layer '{self.name}' ({self.type}) takes {exact} {what} blob(s), got {n}")
            if lo is not None and n < lo:
                raise VggcaffeError(f"layer '{self.name}' ({self.type}) takes at least {lo} {what} blob(s), got {n}")
            if hi is not None and n > hi:
                raise VggcaffeError(f"layer '{self.name}' ({self.type}) takes at most {hi} {what} blob(s), got {n}")
        check("bottom", len(bottom), self.exact_num_bottom, self.min_bottom, self.max_bottom)
        check("top", len(top), self.exact_num_top, self.min_top, self.max_top)

    def allow_force_backward(self, bottom_index):
        return True

    def setup(self, bottom, top):
        self.check_blob_counts(bottom, top)
        self.layer_setup(bottom, top)
        self.param_propagate_down = [True] * len(self.blobs)
        self.reshape(bottom, top)

    def layer_setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError

    def forward(self, bottom, top):
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        pass

    # --- helpers ------------------------------------------------------
    def check_input(self, bad, message):
        """Raise VggcaffeError(message) if any of the boolean array `bad` holds: at once on
        NumPy; on the GPU when the Net next reads the loss (`deferred_check`), so the host
        does not wait for the device here."""
        if array_module(bad) is np:
            if bad.any():
                raise VggcaffeError(message)
        else:
            self.deferred_check = (bad.any(), message)

    def error(self, message):
        """The error of a user mistake in this layer: "layer '<name>' (<type>): message"."""
        return VggcaffeError(f"layer '{self.name}' ({self.type}): {message}")

    def shape_error(self, blob_name, expected, got):
        return VggcaffeError(
            f"layer '{self.name}' ({self.type}): blob '{blob_name}' has shape {tuple(got)}, expected {tuple(expected)}")
