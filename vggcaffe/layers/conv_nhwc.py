"""The channels-last (NHWC) half of the NumPy convolution (see layers/convolution.py).

NHWCConvolution holds ConvolutionLayer's methods for one-group, non-1×1 layers
that run in NHWC: patches of the padded NHWC input read through one strided
view per batch block (runs of kw·C contiguous values), GEMMs against the
weights in (Cout, kh, kw, C) order, the folded bias and ReLU, and the data
gradient either as a transposed convolution (stride 1) or through col2im. On maps
smaller than the kernel the layer is one dense matrix instead (`dense`).
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..blob import is_channels_last
from ..threads import over_blocks, scratch
from .base import add_sums

# Padded NHWC gradient summed at once by col2im (so it stays in a core's L2 cache).
COL2IM_BLOCK_BYTES = 1 << 19


class NHWCConvolution:
    """Mixin of ConvolutionLayer: the NHWC path (uses the layer's geometry and buffers)."""

    def _forward_nhwc(self, x, y):
        co = self.num_output
        cols = self._im2col_nhwc(x)                                       # (N·Ho·Wo, kh·kw·C)
        out, direct = self._nhwc_target(y, "out")
        np.matmul(cols, self._w_nhwc().T, out=out.reshape(-1, co))       # (N·Ho·Wo, Cout)
        self._bias_relu_nhwc(out, y, direct)

    @staticmethod
    def _as_nhwc(a, slot):
        """a (N, C, H, W) as (N, H, W, C): a view of channels-last memory, else a copy in scratch."""
        if is_channels_last(a):
            return a.transpose(0, 2, 3, 1)
        n, c, h, w = a.shape
        a_l = scratch(np, slot, (n, h, w, c), a.dtype)

        def block(n0, n1):
            a_l[n0:n1] = a[n0:n1].transpose(0, 2, 3, 1)
        over_blocks(np, block, n, a.size)
        return a_l

    @staticmethod
    def _nhwc_target(a, slot):
        """(out, direct): where to compute a (N, C, H, W) as (N, H, W, C): a's own memory
        when it is channels-last (direct), else scratch that _from_nhwc copies into a."""
        if is_channels_last(a):
            return a.transpose(0, 2, 3, 1), True
        n, c, h, w = a.shape
        return scratch(np, slot, (n, h, w, c), a.dtype), False

    @staticmethod
    def _from_nhwc(out, a):
        """a (N, C, H, W) = out (N, H, W, C)."""
        def block(n0, n1):
            a[n0:n1] = out[n0:n1].transpose(0, 3, 1, 2)
        over_blocks(np, block, a.shape[0], a.size)

    # --- dense path: maps smaller than the kernel ---------------------------------
    def _forward_dense(self, x, y):
        """Y(N, Ho·Wo·Cout) = X(N, H·W·C) @ Tᵀ, the convolution written out as one matrix:
        on maps smaller than the kernel (VGG's 2×2 conv5 at 32 px) most patch entries
        would be padding, and T does a quarter to half of im2col's multiply-adds."""
        n = x.shape[0]
        t = self._dense_matrix()
        out, direct = self._nhwc_target(y, "out")
        np.matmul(self._as_nhwc(x, "pad").reshape(n, -1), t.T, out=out.reshape(n, -1))
        self._bias_relu_nhwc(out, y, direct)

    def _dense_matrix(self):
        """T (Ho·Wo·Cout, H·W·C): T[q, :, p, :] = W[:, :, i, j] for every input pixel p that
        output pixel q reads through tap (i, j) (dense_taps), zero elsewhere. The layer's
        buffer: zeroed once, its tap blocks rewritten on each forward (the weights change)
        and reused by the backward."""
        w = self.blobs[0].data                                            # (Cout, C, kh, kw)
        (_, c, h, wd), (ho, wo), co = self.in_shape, self.out_hw, self.num_output
        shape = (ho * wo, co, h * wd, c)
        if getattr(self, "_dense_t", None) is None or self._dense_t.shape != shape or self._dense_t.dtype != w.dtype:
            self._dense_t = np.zeros(shape, w.dtype)
        for p, q, i, j in self.dense_taps:
            self._dense_t[q, :, p, :] = w[:, :, i, j]
        return self._dense_t.reshape(ho * wo * co, -1)

    def _backward_dense(self, x, dx, dy, need_dx):
        n, co = x.shape[0], self.num_output
        dy_rows = self._as_nhwc(dy, "out").reshape(n, -1)                 # (N, Ho·Wo·Cout)
        if self.bias_term and self.param_propagate_down[1]:
            add_sums(dy_rows.reshape(-1, co), self.blobs[1].diff, axis=0)
        if self.param_propagate_down[0]:
            g = np.matmul(dy_rows.T, self._as_nhwc(x, "pad").reshape(n, -1))   # (Ho·Wo·Cout, H·W·C)
            g = g.reshape(self._dense_t.shape)
            dw = self.blobs[0].diff
            for p, q, i, j in self.dense_taps:
                dw[:, :, i, j] += g[q, :, p, :]
        if need_dx:
            out, direct = self._nhwc_target(dx, "cols")
            np.matmul(dy_rows, self._dense_t.reshape(-1, out[0].size), out=out.reshape(n, -1))
            if not direct:
                self._from_nhwc(out, dx)

    def _bias_relu_nhwc(self, out, y, direct):
        """y(N, Cout, Ho, Wo), either layout = out(N, Ho, Wo, Cout) + bias, through the
        folded ReLU; `direct`: out is y's own (channels-last) memory."""
        bias = self.blobs[1].data if self.bias_term else None

        def block(n0, n1):
            o, dst = out[n0:n1], y[n0:n1].transpose(0, 2, 3, 1)
            if bias is not None:
                np.add(o, bias, out=dst)
            elif not direct:
                dst[...] = o
            if self.fused_relu:
                np.maximum(dst, 0, out=dst)
        over_blocks(np, block, y.shape[0], y.size)

    def _backward_nhwc(self, x, dx, dy, need_dx):
        co = self.num_output
        need_dw = self.param_propagate_down[0]
        need_db = self.bias_term and self.param_propagate_down[1]
        if not (need_dw or need_db or need_dx):
            return
        dy_l = self._as_nhwc(dy, "out")                                   # (N, Ho, Wo, Cout)
        dy_m = dy_l.reshape(-1, co)                                       # (N·Ho·Wo, Cout)
        if need_db:
            add_sums(dy_m, self.blobs[1].diff, axis=0)
        if need_dw:
            cols = self._im2col_nhwc(x)
            dw = scratch(np, "dw", (co, cols.shape[1]), dy.dtype)
            np.matmul(dy_m.T, cols, out=dw)                               # dW' (Cout, kh·kw·C)
            self.blobs[0].diff += dw.reshape((co,) + self.kernel + (-1,)).transpose(0, 3, 1, 2)
        if need_dx and self.transposed_pad is not None:
            self._backward_data_tconv(dy_l, dx)
        elif need_dx:
            w = self._w_nhwc()
            dcols = scratch(np, "cols", (dy_m.shape[0], w.shape[1]), dy.dtype)
            np.matmul(dy_m, w, out=dcols)                                 # (N·Ho·Wo, kh·kw·C)
            self._col2im_nhwc(dcols, dx)

    def _backward_data_tconv(self, dy_l, dx):
        """dX as the transposed convolution of a stride-1 layer: the convolution of dY,
        padded by dilation·(k - 1) - pad, with W flipped in space and Cout <-> C:
        dX(N·H·W, C) = patches of dY (N·H·W, kh·kw·Cout) @ W_rot (kh·kw·Cout, C)."""
        (n, c, h, w), (kh, kw), co = dx.shape, self.kernel, self.num_output
        wt = self.blobs[0].data                                           # (Cout, C, kh, kw)
        w_rot = scratch(np, "w_rot", (kh, kw, co, c), wt.dtype)
        w_rot[...] = wt[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
        cols = scratch(np, "cols", (n, h, w, kh, kw, co), dy_l.dtype)
        self._patches_nhwc(dy_l, cols, self.transposed_pad, (1, 1))
        out, direct = self._nhwc_target(dx, "out")
        np.matmul(cols.reshape(n * h * w, -1), w_rot.reshape(-1, c), out=out.reshape(-1, c))
        if not direct:
            self._from_nhwc(out, dx)

    def _w_nhwc(self):
        """W' (Cout, kh·kw·C): the weights in the NHWC patch order (a view of the
        channels-last weight blob that reshape makes; a copy if it was replaced)."""
        w = self.blobs[0].data
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)

    def _im2col_nhwc(self, x):
        """X(N, C, H, W), either layout -> cols (N, Ho, Wo, kh, kw, C) viewed as (N·Ho·Wo, kh·kw·C),
        in the thread's scratch."""
        (n, c, _, _), (kh, kw), (ho, wo) = x.shape, self.kernel, self.out_hw
        cols = scratch(np, "cols", (n, ho, wo, kh, kw, c), x.dtype)
        self._patches_nhwc(x.transpose(0, 2, 3, 1), cols, self.pad, self.stride)
        return cols.reshape(n * ho * wo, -1)

    def _patches_nhwc(self, x, cols, pad, stride):
        """cols (N, Ho, Wo, kh, kw, C) = the kernel's patches of x (N, H, W, C), any strides,
        zero-padded by `pad`. Each patch row is read through one strided view of the padded
        input, so with dilation 1 every copy moves runs of kw·C contiguous values."""
        (n, h, w, c), (ph, pw), (sh, sw), (dh, dw) = x.shape, pad, stride, self.dilation
        padded = scratch(np, "pad", (n, h + 2 * ph, w + 2 * pw, c), x.dtype)

        def block(n0, n1):
            p = padded[n0:n1]
            zero_border(p.transpose(1, 2, 0, 3), ph, pw, h, w)
            p[:, ph:ph + h, pw:pw + w] = x[n0:n1]
            s = p.strides
            np.copyto(cols[n0:n1], as_strided(p, (n1 - n0,) + cols.shape[1:],
                                               (s[0], sh * s[1], sw * s[2], dh * s[1], dw * s[2], s[3])))
        over_blocks(np, block, n, cols.size)

    def _col2im_nhwc(self, dcols, dx):
        """dcols (N, Ho, Wo, kh, kw, C) -> dX(N, C, H, W), either layout: add each patch
        back where it was read, a few images at a time so the padded sums stay in cache."""
        (n, c, h, w), (kh, kw), (ph, pw), (ho, wo) = dx.shape, self.kernel, self.pad, self.out_hw
        dcols = dcols.reshape(n, ho, wo, kh, kw, c)
        padded = scratch(np, "pad", (n,) + self.padded_hw + (c,), dx.dtype)
        step = max(1, COL2IM_BLOCK_BYTES // padded[0].nbytes)

        def block(n0, n1):
            for m0 in range(n0, n1, step):
                m1 = min(m0 + step, n1)
                p = padded[m0:m1]
                p[...] = 0
                for i, j, rs, cs in self._offsets():
                    p[:, rs, cs] += dcols[m0:m1, :, :, i, j]
                dx[m0:m1] = p[:, ph:ph + h, pw:pw + w].transpose(0, 3, 1, 2)
        over_blocks(np, block, n, dcols.size)


def zero_border(img, ph, pw, h, w):
    """Zero all of img (Hp, Wp, ...) outside its [ph:ph+h, pw:pw+w] interior."""
    img[:ph] = 0
    img[ph + h:] = 0
    img[:, :pw] = 0
    img[:, pw + w:] = 0
