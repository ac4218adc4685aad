"""InnerProduct (fully connected) layer: y = x·Wᵀ + b over the axes from `axis` on.

The bottom (N, C, H, W) is read as a matrix (M, K): M = the product of the
axes before `axis`, K = the product of the rest, in C·H·W order. The weight is
(num_output, K), or (K, num_output) with `transpose: true`, as in Caffe.
The weight gradient is accumulated in the weight's own layout: on CuPy one
cuBLAS GEMM writes dW += dyᵀ·x (or xᵀ·dy) straight into the diff (beta = 1).
"""
import numpy as np

from ..backend import array_module
from ..blob import Blob
from ..errors import VggcaffeError
from ..fillers import fill
from .base import Layer, add_sums, register


@register("InnerProduct", "INNER_PRODUCT")
class InnerProductLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.inner_product_param
        if p.num_output < 1:
            raise VggcaffeError(f"layer '{self.name}' (InnerProduct): num_output must be positive, got {p.num_output}")
        self.axis = self._canonical_axis(p.axis, bottom[0].shape)
        self.num_output, self.transpose, self.bias_term = p.num_output, p.transpose, p.bias_term
        self.k = int(np.prod(bottom[0].shape[self.axis:], dtype=np.int64))
        shape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.blobs = [Blob(shape, self.dtype)]
        fill(self.blobs[0], p.weight_filler, self.rng)
        if self.bias_term:
            self.blobs.append(Blob((self.num_output,), self.dtype))
            fill(self.blobs[1], p.bias_filler, self.rng)

    def _canonical_axis(self, axis, shape):
        if not -len(shape) <= axis < len(shape):
            raise VggcaffeError(f"layer '{self.name}' (InnerProduct): axis {axis} is out of range "
                                f"for a bottom of shape {tuple(shape)}")
        return axis % len(shape)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        k = int(np.prod(shape[self.axis:], dtype=np.int64))
        if k != self.k:
            name = self.param.bottom[0] if self.param.bottom else "bottom[0]"
            raise VggcaffeError(f"layer '{self.name}' (InnerProduct): blob '{name}' has shape {tuple(shape)}, "
                                f"i.e. {k} inputs from axis {self.axis}, but the weights take {self.k}")
        self.m = int(np.prod(shape[:self.axis], dtype=np.int64))
        top[0].reshape(tuple(shape[:self.axis]) + (self.num_output,))

    def _weight(self, blob_array):
        """The weight (or its diff) as (K, num_output)."""
        return blob_array if self.transpose else blob_array.T

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.m, self.k)                   # (M, K)
        y = top[0].data.reshape(self.m, self.num_output)            # (M, N_out)
        xp = array_module(x)
        xp.matmul(x, self._weight(self.blobs[0].data), out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.m, self.num_output)           # (M, N_out)
        xp = array_module(dy)
        if self.param_propagate_down[0]:
            x = bottom[0].data.reshape(self.m, self.k)               # (M, K)
            if self.transpose:
                add_transposed_product(x, dy, self.blobs[0].diff)    # (K, N_out) += xᵀ·dy
            else:
                add_transposed_product(dy, x, self.blobs[0].diff)    # (N_out, K) += dyᵀ·x
        if self.bias_term and self.param_propagate_down[1]:
            add_sums(dy, self.blobs[1].diff, axis=0)
        if propagate_down[0]:
            xp.matmul(dy, self._weight(self.blobs[0].data).T, out=bottom[0].diff.reshape(self.m, self.k))


def add_transposed_product(u, v, out):
    """out (P, Q) += uᵀ·v for u (M, P), v (M, Q); out C-contiguous. On CuPy one
    GEMM accumulates into out (no temporary, no strided add)."""
    xp = array_module(out)
    if xp is np:
        out += u.T @ v
        return
    from cupy import cublas
    cublas.gemm("T", "N", xp.ascontiguousarray(u), xp.ascontiguousarray(v), out=out, beta=1.0)
