"""The Convolution layer's GPU path: cuDNN graphs behind the layer interface.

`vggcaffe/layers/convolution.py` hands forward/backward here for float32
CuPy blobs when cuDNN is present. Two flags on the layer, set by the net pass
(`vggcaffe.gpu.prepare_net`), change what runs:
  layer.fused_relu     an in-place ReLU follows and was folded in: forward
                       writes relu(conv + b); backward masks dY by Y > 0 first.
  layer.channels_last  the top blobs are NHWC-strided views (every consumer
                       takes any strides), so cuDNN reads and writes them in place.
  layer.top_dtype      bfloat16 (uint16 bits) in bf16 mode where every consumer
                       reads bfloat16: cuDNN then writes the top, and reads its
                       diff, in the compute type, with no casts.
  layer.relu_grad_in_pool  the MAX pool after the folded ReLU does its backward.
Other activations enter cuDNN as NHWC copies in the compute type (float32, or
bfloat16 held as uint16), weights as K·kh·kw·C copies; weight and bias
gradients leave as float32 (or bfloat16, then added into the float32 diffs).
A convolution with few input channels (VGG's conv1_1: 3) has direct kernels too:
forward into a channels-last top (`conv_small_c`) and the weight gradient
(`conv_small_c_wgrad`: partial sums over chunks of pixels, reduced in a fixed
order). cuDNN's engines are slow there (conv1_1 in bf16: 1.5 ms forward where
writing the top takes ~0.15 ms, 1.8 ms backward), so the first run of each shape
times both and keeps the faster (`DIRECT`, `direct_timings`); the data gradient
(none for conv1_1) stays with cuDNN.
Strict fp32 may run NCHW instead (`precision.conv_layout`): C-contiguous blobs
and weights then go to cuDNN as they are (others as C-contiguous copies), and
prepare_net makes no top channels-last.
"""
import os

import cupy
import numpy as np

from ..errors import VggcaffeError
from . import cudnn_conv as cc
from . import kernels, small_c
from .precision import conv_layout, get_precision

F32 = np.dtype(np.float32)
# Tensor-core convolutions want 16-byte channel vectors: in these precisions a channel
# count that is not a multiple runs zero-padded (VGG's conv1_1: 3 -> 8 in bf16, 4 in tf32).
CHANNEL_ALIGN = {"bf16": 8, "tf32": 4}
_choices = {}

# The direct small-C kernels: "auto" (the faster of them and cuDNN, timed at the first
# run of each shape), "always" or "never" where they apply (VGGCAFFE_SMALL_C sets it).
DIRECT = os.environ.get("VGGCAFFE_SMALL_C", "auto")
direct_timings = {}         # (pass, layer, shapes, dtype, precision) -> {"small_c": ms, "cudnn": ms}


def _flat(a):
    """The memory of a channels-last (N, C, H, W) view as one contiguous 1-D array."""
    return a.transpose(0, 2, 3, 1).reshape(-1)


def _nhwc(shape):
    n, c, h, w = shape
    return (n, h, w, c)


class _Layout:
    """How cuDNN's tensors lie in memory: "nhwc" (channels-last) or "nchw" (C order)."""

    def __init__(self, name):
        self.name, self.nhwc = name, name == "nhwc"

    def shape(self, shape):
        """The memory-order shape of an (N, C, H, W) tensor or (K, C, kh, kw) filter."""
        return _nhwc(shape) if self.nhwc else tuple(shape)

    def holds(self, a):
        """`a`, (N, C, H, W)-shaped, already lies in this layout."""
        return cc.is_channels_last(a) if self.nhwc else a.flags.c_contiguous

    def memory(self, a):
        """The memory-order array of an `a` this layout holds."""
        return a.transpose(0, 2, 3, 1) if self.nhwc else a


LAYOUTS = {name: _Layout(name) for name in ("nhwc", "nchw")}


def _choose(key, configs, build):
    """(config, plan): the first of `configs` whose graph `build(config)` cuDNN supports,
    remembered per `key` so refused graphs are tried once."""
    index = _choices.get(key)
    if index is not None:
        return configs[index], build(configs[index])
    errors = []
    for i, config in enumerate(configs):
        try:
            plan = build(config)
        except Exception as e:  # cuDNN reports unsupported graphs with several exception types
            errors.append(f"{config}: {type(e).__name__}: {e}")
            continue
        _choices[key] = i
        return config, plan
    raise VggcaffeError(f"layer '{key[1]}': cuDNN has no engine for {key[0]}: " + " | ".join(errors))


class CudnnConv:
    """Forward/backward of one ConvolutionLayer through cached cuDNN plans."""

    def __init__(self, layer):
        self.layer = layer
        self.saved = {}          # bottom index -> X in cuDNN's layout and compute type, for wgrad
        self.buffers = {}
        self.layout = LAYOUTS["nhwc"]

    def _buffer(self, slot, shape, dtype, zeros=False):
        buf = self.buffers.get(slot)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self.buffers[slot] = (cupy.zeros if zeros else cupy.empty)(shape, dtype)
        return buf

    def _channels(self, precision):
        """(C, the channel count cuDNN sees: C, or C zero-padded to CHANNEL_ALIGN)."""
        c, align = self.layer.blobs[0].shape[1], CHANNEL_ALIGN.get(precision)
        return c, (c if align is None or c % align == 0 else -(-c // align) * align)

    @property
    def geom(self):
        layer = self.layer
        return tuple(layer.pad), tuple(layer.stride), tuple(layer.dilation)

    def reshape(self, bottom, top):
        if getattr(self.layer, "channels_last", False):
            for t in top:
                t.make_channels_last(dtype=getattr(self.layer, "top_dtype", F32))

    def _check_blobs(self, blobs, io):
        for b in blobs:
            if b.data.dtype == kernels.BF16 and io != kernels.BF16:
                raise VggcaffeError(f"layer '{self.layer.name}': its blobs hold bfloat16 (the net was prepared "
                                    f"under precision bf16) but the precision is now {get_precision()}; "
                                    f"set_precision('bf16') or prepare a new net")

    # --- forward -----------------------------------------------------------------
    def forward(self, bottom, top):
        precision = get_precision()
        io = kernels.BF16 if precision == "bf16" else F32
        self._check_blobs(bottom + top, io)
        self.layout = LAYOUTS[conv_layout(precision)]
        c, cp = self._channels(precision)
        w_io = self._weights(io, cp)                                  # (K, kh, kw, Cp) or (K, C, kh, kw)
        for i, (b, t) in enumerate(zip(bottom, top)):
            x_io = self._input(i, b.data, io, cp)                     # (N, H, W, Cp) or (N, C, H, W)
            self._fprop(x_io, w_io, _padded(b.shape, cp), t.data, precision, io)

    def _weights(self, io, cp):
        w = cupy.ascontiguousarray(self.layer.blobs[0].data)         # (K, C, kh, kw)
        if not self.layout.nhwc:                                      # NCHW (fp32 only: no padding)
            self.w_io = w
            return w
        k, c, kh, kw = w.shape
        self.w_io = self._buffer("w", (k, kh, kw, c), io)
        kernels.batched_transpose(w, self.w_io, k, c, kh * kw)
        if cp != c:
            padded = self._buffer("w_pad", (k, kh, kw, cp), io, zeros=True)
            padded[..., :c] = self.w_io
            self.w_io = padded
        return self.w_io

    def _input(self, i, x, io, cp):
        """X (N, C, H, W) as a contiguous array in cuDNN's layout and the compute type, with
        Cp channels (a view when it already is one)."""
        if self.layout.holds(x) and x.dtype == io:
            buf = self.layout.memory(x)
        elif not self.layout.nhwc:
            buf = self._buffer(("x", i), x.shape, io)
            buf[...] = x
        elif cc.is_channels_last(x):
            buf = self._buffer(("x", i), _nhwc(x.shape), io)
            kernels.to_bf16(_flat(x), buf.reshape(-1))
        else:
            buf = self._buffer(("x", i), _nhwc(x.shape), io)
            kernels.nchw_to_nhwc(cupy.ascontiguousarray(x), buf)
        if cp != x.shape[1]:
            padded = self._buffer(("x_pad", i), _nhwc(_padded(x.shape, cp)), io, zeros=True)
            padded[..., :x.shape[1]] = buf
            buf = padded
        self.saved[i] = buf
        return buf

    def _fprop(self, x_io, w_io, x_shape, y, precision, io):
        """Y from the compute-type X and W: cuDNN, or the direct small-C kernel (DIRECT)."""
        def cudnn():
            self._fprop_cudnn(x_io, w_io, x_shape, y, precision, io)

        def direct():
            self._fprop_small_c(x_io, w_io, y)
        key = ("fprop", self.layer.name, tuple(x_shape), tuple(y.shape), y.dtype.str, precision)
        (direct if self._small_c_applies(y) and _use_direct(key, direct, cudnn) else cudnn)()

    def _small_c(self):
        """The direct kernels can compute this layer: NHWC, few input channels, K % 8 == 0, no
        dilation, kw * C <= 12 (registers of the weight gradient), weights that fit in shared
        memory."""
        layer = self.layer
        k, c, kh, kw = layer.blobs[0].shape
        return (self.layout.nhwc and c <= small_c.SMALL_C and k % 8 == 0 and tuple(layer.dilation) == (1, 1)
                and kw * c <= 12 and (k * kh * kw * c + k) * 4 <= 48 << 10)

    def _small_c_applies(self, y):
        """The direct forward can write top `y`: a small-C layer, a channels-last float32 or
        bfloat16 top."""
        return self._small_c() and cc.is_channels_last(y) and y.dtype in (F32, kernels.BF16)

    def _wgrad_small_c(self, x_io, dz):
        """dW (K, kh, kw, C) float32 from the NHWC compute-type X and dZ: partial sums over
        chunks of output pixels, then summed in two fixed-order stages."""
        layer = self.layer
        k, c, kh, kw = layer.blobs[0].shape
        n, oh, ow, _ = dz.shape
        _, h, w, cp = x_io.shape
        (ph, pw), (sh, sw) = layer.pad, layer.stride
        pixels = n * oh * ow
        parts = -(-pixels // small_c.WGRAD_CHUNK)
        cols = k * kh * kw * c
        partial_kernel, sum_kernel = small_c.wgrad_kernels(x_io.dtype.str, c, kw, pixels >= 2**31)
        partial = cc.scratch("small_c_partial", (parts, cols), F32)
        slices = cc.scratch("small_c_slices", (small_c.WGRAD_SLICES, cols), F32)
        dw = cc.scratch("dw", (k, kh, kw, c), F32)
        total, i32 = parts * (k // 8) * kh, np.int32
        partial_kernel((int(min((total + 255) // 256, 1 << 20)), 1, 1), (256, 1, 1),
                       (x_io, dz, partial, np.int64(total), np.int64(pixels), i32(small_c.WGRAD_CHUNK), i32(cp), i32(h),
                        i32(w), i32(k), i32(oh), i32(ow), i32(kh), i32(sh), i32(sw), i32(ph), i32(pw)))
        for src, dst, rows, count in ((partial, slices, parts, small_c.WGRAD_SLICES), (slices, dw, small_c.WGRAD_SLICES, 1)):
            sum_kernel((int(min((count * cols + 255) // 256, 1 << 20)), 1, 1), (256, 1, 1),
                       (src, dst, np.int64(rows), i32(cols), i32(count)))
        return dw

    def _fprop_small_c(self, x_io, w_io, y):
        layer = self.layer
        k, c, kh, kw = layer.blobs[0].shape
        n, _, oh, ow = y.shape
        _, h, w, cp = x_io.shape
        (ph, pw), (sh, sw) = layer.pad, layer.stride
        total = n * oh * ow * (k // 8)
        bias = layer.blobs[1].data if layer.bias_term else y        # not read without a bias
        kernel = small_c.forward_kernel(x_io.dtype.str, y.dtype.str, total >= 2**31 or y.size >= 2**31)
        i32 = np.int32
        kernel((int(min((total + 255) // 256, 2048)), 1, 1), (256, 1, 1),
               (x_io, w_io, bias, y, np.int64(total), i32(c), i32(cp), i32(h), i32(w), i32(k), i32(oh), i32(ow),
                i32(kh), i32(kw), i32(sh), i32(sw), i32(ph), i32(pw), i32(layer.bias_term),
                i32(getattr(layer, "fused_relu", False))),
               shared_mem=(k * kh * kw * c + k) * 4)

    def _fprop_cudnn(self, x_io, w_io, x_shape, y, precision, io):
        layer = self.layer
        relu = getattr(layer, "fused_relu", False)
        k, _, kh, kw = layer.blobs[0].shape
        w_shape = (k, x_shape[1], kh, kw)
        args = (tuple(x_shape), w_shape, tuple(y.shape), self.geom)
        configs = [(layer.bias_term, relu, False), (layer.bias_term, relu, True),
                   (False, False, False), (False, False, True)]
        if io == F32:
            configs = [c for c in configs if not c[2]]
        elif y.dtype == io:                                           # a bfloat16 top: written as is
            configs = [c for c in configs if c[2]]
        layout = self.layout
        (bias, act, out_io), plan = _choose(
            ("fprop", layer.name) + args + (layer.bias_term, relu, y.dtype.str, layout.name, precision), configs,
            lambda config: cc.fprop_plan(*args, *config, precision, layout.name))
        pointers = dict(X=x_io.data.ptr, W=w_io.data.ptr)
        if bias:
            pointers["B"] = layer.blobs[1].data.data.ptr
        out_dtype = io if out_io else F32
        direct = layout.holds(y) and y.dtype == out_dtype
        out = layout.memory(y) if direct else cc.scratch("y", layout.shape(y.shape), out_dtype)
        plan.run(Y=out.data.ptr, **pointers)
        if not direct:
            _store(out, y, layout)
        if (layer.bias_term and not bias) or (relu and not act):
            b = layer.blobs[1].data.reshape(1, -1, 1, 1) if layer.bias_term and not bias else np.float32(0)
            (kernels.bias_relu_bf16 if y.dtype == kernels.BF16 else cc.bias_relu)(b, relu and not act, y)

    # --- backward ----------------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        precision = get_precision()
        io = kernels.BF16 if precision == "bf16" else F32
        need_dw = layer.param_propagate_down[0]
        need_db = layer.bias_term and layer.param_propagate_down[1]
        self._check_blobs(bottom + top, io)
        _, cp = self._channels(precision)
        for i, (b, t) in enumerate(zip(bottom, top)):
            if not (need_dw or need_db or propagate_down[i]):
                continue
            dz = self._top_grad(t, io)                                # (N, Ho, Wo, K) or (N, K, Ho, Wo)
            dy_shape = tuple(t.shape)
            if need_db:
                db = cc.scratch("db", (dy_shape[1],), F32)
                cc.bias_grad_plan(dy_shape, precision, self.layout.name).run(DY=dz.data.ptr, DB=db.data.ptr)
                layer.blobs[1].diff += db
            if need_dw:
                self._wgrad(i, dz, _padded(b.shape, cp), dy_shape, precision, io)
            if propagate_down[i]:
                self._dgrad(dz, b, dy_shape, precision, io, cp)

    def _top_grad(self, t, io):
        """dZ = dY (masked by Y > 0 when the ReLU was fused and no pool did it), in cuDNN's
        layout and the compute type."""
        dy, y = t.diff, t.data
        relu = getattr(self.layer, "fused_relu", False) and not getattr(self.layer, "relu_grad_in_pool", False)
        if not self.layout.nhwc:                                       # fp32, NCHW
            if relu:
                kernels.relu_grad(dy, y, dy)
            if dy.flags.c_contiguous:
                return dy
            buf = cc.scratch("dz", dy.shape, F32)
            buf[...] = dy
            return buf
        if dy.dtype == kernels.BF16:                                   # a bfloat16 top, channels-last
            if relu:
                kernels.relu_grad_bf16_inplace(_flat(y), _flat(dy))
            return dy.transpose(0, 2, 3, 1)
        if cc.is_channels_last(dy) and cc.is_channels_last(y):
            if io == F32:
                if relu:
                    kernels.relu_grad(_flat(dy), _flat(y), _flat(dy))
                return dy.transpose(0, 2, 3, 1)
            buf = cc.scratch("dz", _nhwc(dy.shape), io)
            if relu:
                kernels.relu_grad_bf16(_flat(dy), _flat(y), buf.reshape(-1))
            else:
                kernels.to_bf16(_flat(dy), buf.reshape(-1))
            return buf
        if relu:
            kernels.relu_grad(dy, y, dy)
        buf = cc.scratch("dz", _nhwc(dy.shape), io)
        kernels.nchw_to_nhwc(cupy.ascontiguousarray(dy), buf)
        return buf

    def _wgrad(self, i, dz, x_shape, dy_shape, precision, io):
        w_blob = self.layer.blobs[0]
        k, c, kh, kw = w_blob.shape
        cp = x_shape[1]
        args = (tuple(x_shape), dy_shape, (k, cp, kh, kw), self.geom)
        layout = self.layout
        result = {}

        def cudnn():
            out_io, plan = _choose(("wgrad", self.layer.name) + args + (layout.name, precision),
                                   [True, False] if io != F32 else [False],
                                   lambda o: cc.wgrad_plan(*args, o, precision, layout.name))
            result["dw"] = cc.scratch("dw", layout.shape((k, cp, kh, kw)), io if out_io else F32)
            plan.run(X=self.saved[i].data.ptr, DY=dz.data.ptr, DW=result["dw"].data.ptr)

        def direct():
            result["dw"] = self._wgrad_small_c(self.saved[i], dz)
        key = ("wgrad", self.layer.name, tuple(x_shape), dy_shape, dz.dtype.str, precision)
        applies = self._small_c() and dz.flags.c_contiguous and dz.dtype == self.saved[i].dtype
        (direct if applies and _use_direct(key, direct, cudnn) else cudnn)()
        dw = result["dw"]
        if not layout.nhwc:
            w_blob.diff += dw
            return
        if dw.shape[-1] != c:
            dw = cupy.ascontiguousarray(dw[..., :c])
        kernels.batched_transpose(dw, w_blob.diff, k, kh * kw, c, accumulate=True)

    def _dgrad(self, dz, b, dy_shape, precision, io, cp):
        dx = b.diff                                                    # (N, C, H, W)
        k, c, kh, kw = self.layer.blobs[0].shape
        args = (dy_shape, (k, cp, kh, kw), _padded(dx.shape, cp), self.geom)
        options = [False] if io == F32 else [True, False] if dx.dtype == io else [False, True]
        layout = self.layout
        out_io, plan = _choose(("dgrad", self.layer.name) + args + (dx.dtype.str, layout.name, precision), options,
                               lambda o: cc.dgrad_plan(*args, o, precision, layout.name))
        out_dtype = io if out_io else F32
        direct = layout.holds(dx) and dx.dtype == out_dtype and cp == c
        out = layout.memory(dx) if direct else cc.scratch("dx", layout.shape(args[2]), out_dtype)
        plan.run(DY=dz.data.ptr, W=self.w_io.data.ptr, DX=out.data.ptr)
        if not direct:
            _store(out if cp == c else cupy.ascontiguousarray(out[..., :c]), dx, layout)


def _use_direct(key, direct, cudnn):
    """Whether to run the direct kernel rather than cuDNN for `key` (DIRECT; "auto" times the
    no-argument launches `direct` and `cudnn` the first time and keeps the faster)."""
    if DIRECT not in ("auto", "always", "never"):
        raise VggcaffeError(f"VGGCAFFE_SMALL_C='{DIRECT}': choose auto, always or never")
    if DIRECT != "auto":
        return DIRECT == "always"
    if key not in direct_timings:
        try:
            cudnn_ms = cc._elapsed_ms(cudnn)
        except VggcaffeError:                 # cuDNN has no engine for this layer
            cudnn_ms = float("inf")
        direct_timings[key] = {"cudnn": cudnn_ms, "small_c": cc._elapsed_ms(direct)}
    return direct_timings[key]["small_c"] < direct_timings[key]["cudnn"]


def _padded(shape, cp):
    n, _, h, w = shape
    return (n, cp, h, w)


def _store(src, dst, layout):
    """dst (N, C, H, W), either layout, = src, a contiguous float32 or bf16 array in `layout`."""
    if not layout.nhwc:
        dst[...] = src
    elif cc.is_channels_last(dst) and src.dtype == dst.dtype:
        _flat(dst)[...] = src.reshape(-1)
    elif cc.is_channels_last(dst):
        (kernels.to_bf16 if dst.dtype == kernels.BF16 else kernels.from_bf16)(src.reshape(-1), _flat(dst))
    elif dst.flags.c_contiguous:
        kernels.nhwc_to_nchw(src, dst)
    else:
        tmp = cupy.empty(dst.shape, F32)
        kernels.nhwc_to_nchw(src, tmp)
        dst[...] = tmp
