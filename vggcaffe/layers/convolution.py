"""Convolution layer (Caffe's ConvolutionParameter), 2-D, as im2col + one GEMM per batch.

On NumPy a layer runs in one of two layouts, picked in reshape by its shape
(use_nhwc: the rule measured on VGG's layers, or FORCE_NHWC).

Channels first (NCHW; any layer, the only one on CuPy): the patch matrix ("cols") of a whole batch is (C, kh, kw, N, Ho, pitch),
i.e. (C·kh·kw) × (N·P), so each pass is one BLAS call per group:
    forward       Y(Cout, N·P)   = W(Cout, C·kh·kw) @ cols, then to (N, Cout, Ho, Wo) + bias
    weight grad   dWᵀ            = cols @ dY(Cout, N·P)ᵀ
    data grad     dcols          = Wᵀ @ dY, then col2im (slice-adds per kernel offset)
with P = Ho·pitch. pitch is Wo, except for stride-1 layers on wide maps (all
of VGG's 3×3 layers down to 28×28): there patches are taken for all Wp
columns of the padded rows, so each kernel offset copies one contiguous run
per image plane, at the cost of Wp - Wo wasted output columns per row.
A 1×1, stride-1, unpadded convolution needs no patches: Y(N, Cout, P) = W @ X(N, C, P).
With a channels-last top (one group, pitch Wo) the GEMM is Yᵀ = colsᵀ @ Wᵀ, which
is the top's NHWC memory, and dY is read from it the same way.

Channels last (NHWC; one group, not 1×1; faster for many channels on small
maps): X is padded into (N, Hp, Wp, C) and the patches are (N, Ho, Wo, kh, kw, C),
so every copy moves runs of kw·C contiguous values:
    forward       Y(N·Ho·Wo, Cout)  = cols(N·Ho·Wo, kh·kw·C) @ W'ᵀ, + bias
    weight grad   dW'(Cout, kh·kw·C) = dYᵀ @ cols
    data grad     stride 1: dX(N·H·W, C) = patches of dY @ W rotated (a convolution, see
                  _backward_data_tconv); otherwise dcols = dY @ W', then col2im
W' (Cout, kh·kw·C) is W in (Cout, kh, kw, C) order: the layer keeps its weight
blob channels-last (vggcaffe.blob), so W' and dW' are views of it. On a map smaller
than the kernel (H·W < kh·kw) the NHWC layer is instead one dense (Ho·Wo·Cout, H·W·C)
matrix, with no patches (`dense`, layers/conv_nhwc.py).

Bottoms and tops may be channels-last blobs (vggcaffe.blob); `channels_last`
(set by vggcaffe.cpu.prepare_net when every consumer accepts it) makes the
tops so, and then neither path transposes Y or dY. `fused_relu` (also set by
prepare_net) folds the in-place ReLU after the layer into it: forward writes
max(Y + b, 0), backward first does the ReLU's own in-place dY *= (Y > 0).

Patch matrices live in a scratch buffer shared by all convolutions of a
thread, so memory stays one layer's worth, and at most MAX_COLS_BYTES: a batch
whose patch matrix would be larger goes through in slices of images. The
backward rebuilds them, except in an NCHW layer on NumPy in a TRAIN net when its
whole batch of patches fits MAX_CACHED_COLS_BYTES: then the forward writes them
into a buffer of the layer, one per bottom, that the backward reads (valid from a
forward until the next reshape or forward; the bottom's data must not change
between forward and backward, as in Caffe). NHWC layers always rebuild: their
patches are one strided copy of an input still in cache, measured as fast as
keeping them on the demo net, which saves a buffer per layer (70 MB there).
On NumPy the copies run over blocks of channels or images on all CPU cores
(vggcaffe.threads); BLAS threads the GEMMs.
"""
import numpy as np

from ..backend import array_module
from ..blob import Blob, is_channels_last
from ..fillers import fill
from ..threads import over_blocks, scratch
from .base import Layer, add_sums, register
from .conv_nhwc import NHWCConvolution, zero_border

# Largest patch matrix built at once; bigger batches go through in slices of images.
MAX_COLS_BYTES = 1 << 29
# Largest NCHW patch matrix a layer keeps from forward to backward (and largest dense NHWC matrix).
MAX_CACHED_COLS_BYTES = 1 << 26
# None: each NumPy layer's layout comes from use_nhwc; True/False: forced where it applies.
FORCE_NHWC = None


def use_nhwc(channels, out_width):
    """Whether the NHWC path is the faster one: measured on 2 cores over VGG's 3×3 layers
    (32-px maps at batch 64, 112-px at batch 16), it wins from 32 input channels on maps
    up to 16 wide (up to 2× in backward, more with channels-last blobs around it) and
    loses on wider maps and on few channels."""
    return channels >= 32 and out_width <= 16


@register("Convolution", "CONVOLUTION")
class ConvolutionLayer(NHWCConvolution, Layer):
    min_bottom = 1
    min_top = 1

    # --- setup ------------------------------------------------------------
    def layer_setup(self, bottom, top):
        p = self.param.convolution_param
        if len(bottom) != len(top):
            raise self.error(f"takes one top per bottom, got {len(bottom)} bottoms and {len(top)} tops")
        if len(bottom[0].shape) != 4 or p.axis not in (1, -3):
            raise self.error(f"supports 2-D convolution of 4-D (N, C, H, W) blobs along axis 1 only; "
                             f"bottom has shape {tuple(bottom[0].shape)}, axis {p.axis}")
        self.kernel = self._pair(p.kernel_size, "kernel_h", "kernel_w", "kernel_size", None)
        self.pad = self._pair(p.pad, "pad_h", "pad_w", "pad", 0)
        self.stride = self._pair(p.stride, "stride_h", "stride_w", "stride", 1)
        self.dilation = self._pair(p.dilation, None, None, "dilation", 1)
        for name, values in (("kernel_size", self.kernel), ("stride", self.stride), ("dilation", self.dilation)):
            if min(values) < 1:
                raise self.error(f"{name} must be positive, got {values}")
        self.num_output, self.group, self.channels = p.num_output, p.group, bottom[0].shape[1]
        if self.num_output < 1 or self.group < 1:
            raise self.error(f"num_output ({self.num_output}) and group ({self.group}) must be positive")
        if self.channels % self.group or self.num_output % self.group:
            raise self.error(f"channels ({self.channels}) and num_output ({self.num_output}) "
                             f"must both be divisible by group ({self.group})")
        self.is_1x1 = self.kernel == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0)
        self.bias_term = p.bias_term
        # Set by vggcaffe.cpu / vggcaffe.gpu prepare_net (relu_grad_in_pool: the folded
        # ReLU's backward is done by the MAX pool after it, see PoolingLayer.relu_mask).
        self.fused_relu = self.channels_last = self.relu_grad_in_pool = False
        self.blobs = [Blob((self.num_output, self.channels // self.group) + self.kernel, self.dtype)]
        fill(self.blobs[0], p.weight_filler, self.rng)
        if self.bias_term:
            self.blobs.append(Blob((self.num_output,), self.dtype))
            fill(self.blobs[1], p.bias_filler, self.rng)

    def _pair(self, repeated, h_field, w_field, name, default):
        """(h, w) from `name` (0, 1 or 2 values) or from its _h/_w fields."""
        p = self.param.convolution_param
        if h_field and (p.HasField(h_field) or p.HasField(w_field)):
            if not (p.HasField(h_field) and p.HasField(w_field)) or len(repeated):
                raise self.error(f"give either {name} or both {h_field} and {w_field}")
            return getattr(p, h_field), getattr(p, w_field)
        if len(repeated) == 0 and default is None:
            raise self.error(f"{name} (or {h_field} and {w_field}) is required")
        if len(repeated) > 2:
            raise self.error(f"{name} has {len(repeated)} values; a 2-D convolution takes 1 or 2")
        values = list(repeated) or [default]
        return values[0], values[-1]

    def reshape(self, bottom, top):
        n, c, h, w = bottom[0].shape
        if c != self.channels:
            raise self.shape_error(self.param.bottom[0] if self.param.bottom else "bottom[0]",
                                   (n, self.channels, h, w), bottom[0].shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.shape_error(self.param.bottom[i] if len(self.param.bottom) > i else f"bottom[{i}]",
                                       bottom[0].shape, b.shape)
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self.kernel, self.pad, self.stride, self.dilation
        hp, wp = h + 2 * ph, w + 2 * pw
        ho = (hp - (dh * (kh - 1) + 1)) // sh + 1
        wo = (wp - (dw * (kw - 1) + 1)) // sw + 1
        if ho < 1 or wo < 1:
            raise self.error(f"kernel {self.kernel} (dilation {self.dilation}) is larger than the "
                             f"padded input {hp}x{wp}")
        like = bottom[0].template                  # its module and dtype (no memory is allocated)
        self.nhwc = array_module(like) is np and self.group == 1 and not self.is_1x1 and (
            use_nhwc(c, wo) if FORCE_NHWC is None else FORCE_NHWC)
        # Either NumPy path can write channels-last tops (for vggcaffe.cpu.prepare_net).
        self.writes_channels_last = array_module(like) is np and self.group == 1 and not self.is_1x1
        # Stride 1 on a wide enough map: patches are computed for all Wp columns
        # of each row (Wp - Wo of them wasted), so every patch row is one
        # contiguous run of the padded image ("flat" windows). Not for channels-last
        # tops: without the wasted columns the GEMM writes them in place.
        self.flat = (not self.nhwc and (sh, sw) == (1, 1) and 8 * (wp - wo) <= wo
                     and not (self.channels_last and self.writes_channels_last))
        self.in_shape, self.out_hw = (n, c, h, w), (ho, wo)
        self.pitch = wp if self.flat else wo
        self.padded_hw = (hp + self.flat, wp)
        image_cols_bytes = fwd_cols_bytes = c * kh * kw * ho * self.pitch * like.dtype.itemsize
        # The NHWC data gradient of a stride-1 layer is a convolution of dY (no col2im)
        # when its padding, dilation·(k - 1) - pad, is not negative; measured faster
        # from 4×4 maps up (on 2×2 maps the patches of dY are mostly padding) where
        # Cout <= C (with more outputs, dY's patches outgrow what col2im saves).
        t_pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
        self.transposed_pad = t_pad if (self.nhwc and (sh, sw) == (1, 1) and min(t_pad) >= 0
                                        and min(h, w) >= 4 and self.num_output <= c) else None
        if self.transposed_pad:
            image_cols_bytes = max(image_cols_bytes, self.num_output * kh * kw * h * w * like.dtype.itemsize)
        self.images_per_pass = max(1, MAX_COLS_BYTES // image_cols_bytes)
        self.keep_cols = (array_module(like) is np and not self.is_1x1 and not self.nhwc
                          and self.phase == "TRAIN"
                          and self.images_per_pass >= n and n * fwd_cols_bytes <= MAX_CACHED_COLS_BYTES)
        self._cols_valid = [False] * len(bottom)
        # NHWC on a map smaller than the kernel (H·W < kh·kw): as one dense matrix, when it fits.
        self.dense = (self.nhwc and h * w < kh * kw
                      and h * w * ho * wo * c * self.num_output * like.dtype.itemsize <= MAX_CACHED_COLS_BYTES)
        self.dense_taps = [(y * w + x, oy * wo + ox, i, j)
                           for oy in range(ho) for ox in range(wo) for i in range(kh) for j in range(kw)
                           for y, x in [(oy * sh - ph + i * dh, ox * sw - pw + j * dw)]
                           if 0 <= y < h and 0 <= x < w] if self.dense else []
        if self.nhwc:
            self.blobs[0].make_channels_last(keep_values=True)
        for t in top:
            t.reshape(n, self.num_output, ho, wo)
            if self.channels_last and self.writes_channels_last:
                t.make_channels_last()
        if self._cudnn(like):
            self._gpu.reshape(bottom, top)

    # --- forward / backward -------------------------------------------------
    def _cudnn(self, x):
        """True when vggcaffe.gpu runs this layer through cuDNN (CuPy float32 data, one group)."""
        if array_module(x) is np:
            return False
        if not hasattr(self, "_gpu"):
            from ..gpu import conv, cudnn_conv
            self._gpu = conv.CudnnConv(self) if cudnn_conv.applies(self, x) else None
        return self._gpu is not None

    def forward(self, bottom, top):
        if self._cudnn(bottom[0].data):
            return self._gpu.forward(bottom, top)
        for b, (x, y) in enumerate(zip(bottom, top)):
            for images in self._batch_slices():
                if self.dense:
                    self._forward_dense(x.data[images], y.data[images])
                elif self.nhwc:
                    self._forward_nhwc(x.data[images], y.data[images])
                else:
                    self._forward_one(b, x.data[images], y.data[images])

    def _batch_slices(self):
        n, step = self.in_shape[0], self.images_per_pass
        return [slice(n0, min(n0 + step, n)) for n0 in range(0, n, step)]

    def _forward_one(self, b, x, y):
        xp = array_module(x)
        (n, c, _, _), (ho, wo), g, co = x.shape, self.out_hw, self.group, self.num_output
        w = self.blobs[0].data.reshape(g, co // g, -1)                    # (g, Cout/g, C/g·kh·kw)
        if self.is_1x1:
            # Y(N, g, Cout/g, P) = W(g, Cout/g, C/g) @ X(N, g, C/g, P)
            xp.matmul(w, x.reshape(n, g, c // g, ho * wo), out=y.reshape(n, g, co // g, ho * wo))
            if self.bias_term:
                y += self.blobs[1].data[None, :, None, None]
            if self.fused_relu:
                xp.maximum(y, 0, out=y)
            return
        cols = self._im2col(xp, x, b)                                     # (g, C/g·kh·kw, N·Ho·pitch)
        self._cols_valid[b] = self.keep_cols
        if is_channels_last(y) and self.pitch == wo:                      # one group (see reshape)
            out = y.transpose(0, 2, 3, 1)
            xp.matmul(cols[0].T, w[0].T, out=out.reshape(-1, co))        # Yᵀ(N·Ho·Wo, Cout), in place
            self._bias_relu_nhwc(out, y, direct=True)
            return
        out = scratch(xp, "out", (g, co // g, cols.shape[2]), x.dtype)    # (g, Cout/g, N·Ho·pitch)
        xp.matmul(w, cols, out=out)
        self._to_nchw(xp, out.reshape(co, n, ho, self.pitch), y)

    def backward(self, top, propagate_down, bottom):
        if self._cudnn(bottom[0].data):
            return self._gpu.backward(top, propagate_down, bottom)
        for b, (x, y) in enumerate(zip(bottom, top)):
            for images in self._batch_slices():
                if self.fused_relu and not self.relu_grad_in_pool:
                    self._relu_grad(y.data[images], y.diff[images])
                if self.dense:
                    self._backward_dense(x.data[images], x.diff[images], y.diff[images], propagate_down[b])
                elif self.nhwc:
                    self._backward_nhwc(x.data[images], x.diff[images], y.diff[images], propagate_down[b])
                else:
                    self._backward_one(b, x.data[images], x.diff[images], y.diff[images], propagate_down[b])

    def _relu_grad(self, y, dy):
        """The folded ReLU's backward, in place as the in-place ReLU's: dY *= (Y > 0)."""
        xp = array_module(dy)

        def block(n0, n1):
            xp.multiply(dy[n0:n1], y[n0:n1] > 0, out=dy[n0:n1])
        over_blocks(xp, block, dy.shape[0], dy.size)

    def _backward_one(self, b, x, dx, dy, need_dx):
        xp = array_module(dy)
        (n, c, _, _), (ho, wo), g, co = x.shape, self.out_hw, self.group, self.num_output
        need_dw = self.param_propagate_down[0]
        need_db = self.bias_term and self.param_propagate_down[1]
        w_t = self.blobs[0].data.reshape(g, co // g, -1).transpose(0, 2, 1)  # (g, C/g·kh·kw, Cout/g)
        if (need_dw or need_db or (need_dx and not self.is_1x1)) and is_channels_last(dy) and self.pitch == wo:
            dy_g = dy.transpose(0, 2, 3, 1).reshape(1, -1, co).transpose(0, 2, 1)   # (1, Cout, N·Ho·Wo) view
        elif need_dw or need_db or (need_dx and not self.is_1x1):
            dy_g = self._channels_first(xp, dy, "out", self.pitch).reshape(g, co // g, -1)
        if need_db:
            add_sums(dy_g.reshape(co, -1), self.blobs[1].diff, axis=1)
        if need_dw:
            cols = self._im2col(xp, x, b, reuse=True) if not self.is_1x1 else \
                self._channels_first(xp, x, "cols", x.shape[3]).reshape(g, c // g, -1)
            # dWᵀ(g, C/g·kh·kw, Cout/g) = cols @ dYᵀ
            dw_t = xp.matmul(cols, dy_g.transpose(0, 2, 1))
            self.blobs[0].diff += dw_t.transpose(0, 2, 1).reshape(self.blobs[0].shape)
        if need_dx and self.is_1x1:
            # dX(N, g, C/g, P) = Wᵀ @ dY(N, g, Cout/g, P)
            xp.matmul(w_t, dy.reshape(n, g, co // g, ho * wo), out=dx.reshape(n, g, c // g, ho * wo))
        elif need_dx:
            dcols = scratch(xp, "cols", (g, w_t.shape[1], dy_g.shape[2]), dy.dtype)
            xp.matmul(w_t, dy_g, out=dcols)
            self._col2im(xp, dcols, dx)

    # --- layouts and patches ----------------------------------------------------
    def _to_nchw(self, xp, out, y):
        """y(N, Cout, Ho, Wo) = out(Cout, N, Ho, pitch)[..., :Wo] + bias."""
        wo = y.shape[3]
        bias = self.blobs[1].data[:, None, None] if self.bias_term else None

        def block(o0, o1):
            src = out[o0:o1, :, :, :wo].transpose(1, 0, 2, 3)
            if bias is None:
                y[:, o0:o1] = src
            else:
                xp.add(src, bias[o0:o1], out=y[:, o0:o1])
            if self.fused_relu:
                xp.maximum(y[:, o0:o1], 0, out=y[:, o0:o1])
        over_blocks(xp, block, y.shape[1], y.size)

    def _channels_first(self, xp, a, slot, pitch):
        """a(N, C, H, W) -> scratch (C, N, H, pitch), zero in the pitch - W extra columns."""
        n, c, h, w = a.shape
        a_t = scratch(xp, slot, (c, n, h, pitch), a.dtype)

        def block(c0, c1):
            a_t[c0:c1, :, :, :w] = a[:, c0:c1].transpose(1, 0, 2, 3)
            a_t[c0:c1, :, :, w:] = 0
        over_blocks(xp, block, c, a_t.size)
        return a_t

    def _windows(self, block):
        """For each kernel offset (i, j): the (C, N, Ho, pitch) view of a padded
        (N, C, Hp, Wp) block that the offset reads."""
        (dh, dw), ho = self.dilation, self.out_hw[0]
        n, c, hp, wp = block.shape
        img = block.transpose(1, 0, 2, 3)                                 # (C, N, Hp, Wp)
        rows = block.reshape(n, c, hp * wp).transpose(1, 0, 2)           # (C, N, Hp·Wp), same memory
        for i, j, rs, cs in self._offsets():
            if self.flat:
                start = i * dh * wp + j * dw
                yield i, j, rows[:, :, start:start + ho * wp].reshape(c, n, ho, wp)
            else:
                yield i, j, img[:, :, rs, cs]

    def _offsets(self):
        """For each kernel offset (i, j): the row and column slices of the padded image it reads."""
        (kh, kw), (sh, sw), (dh, dw), (ho, wo) = self.kernel, self.stride, self.dilation, self.out_hw
        for i in range(kh):
            for j in range(kw):
                yield i, j, slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)

    def _cols_buffer(self, xp, b, shape, dtype):
        """Where the patches of bottom b go: the layer's own buffer when it keeps them
        (b given), else the thread's scratch."""
        if b is None or not self.keep_cols:
            return scratch(xp, "cols", shape, dtype)
        size = int(np.prod(shape))
        buffers = self.__dict__.setdefault("_cols", {})
        buf = buffers.get(b)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = buffers[b] = np.empty(size, dtype)
        return buf[:size].reshape(shape)

    def _im2col(self, xp, x, b=None, reuse=False):
        """X(N, C, H, W) -> cols (C, kh, kw, N, Ho, pitch) viewed as (g, C/g·kh·kw, N·Ho·pitch);
        `reuse`: the ones the forward kept for bottom b, when it did."""
        (n, c, h, w), (kh, kw), (ph, pw) = x.shape, self.kernel, self.pad
        cols = self._cols_buffer(xp, b, (c, kh, kw, n, self.out_hw[0], self.pitch), x.dtype)
        if reuse and self._cols_valid[b]:
            return cols.reshape(self.group, c // self.group * kh * kw, -1)
        padded = scratch(xp, "pad", (n, c) + self.padded_hw, x.dtype)

        def block(c0, c1):
            zero_border(padded[:, c0:c1].transpose(2, 3, 0, 1), ph, pw, h, w)
            padded[:, c0:c1, ph:ph + h, pw:pw + w] = x[:, c0:c1]
            for i, j, window in self._windows(padded[:, c0:c1]):
                cols[c0:c1, i, j] = window
        over_blocks(xp, block, c, cols.size)
        return cols.reshape(self.group, c // self.group * kh * kw, -1)

    def _col2im(self, xp, dcols, dx):
        """dcols (C, kh, kw, N, Ho, pitch) -> dX(N, C, H, W): add each patch back where it was read."""
        (n, c, h, w), (kh, kw), (ph, pw) = dx.shape, self.kernel, self.pad
        dcols = dcols.reshape(c, kh, kw, n, self.out_hw[0], self.pitch)
        padded = scratch(xp, "pad", (n, c) + self.padded_hw, dx.dtype)

        def block(c0, c1):
            padded[:, c0:c1] = 0
            for i, j, window in self._windows(padded[:, c0:c1]):
                window += dcols[c0:c1, i, j]
            dx[:, c0:c1] = padded[:, c0:c1, ph:ph + h, pw:pw + w]
        over_blocks(xp, block, c, dcols.size)
