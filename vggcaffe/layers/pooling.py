"""Pooling: MAX and AVE over kernel windows, with Caffe's ceil-mode output size.

Every window is read as one strided view per kernel offset (i, j), so the loops
run over kh*kw offsets, never over pixels. The input is copied into a padded
buffer only when a window reaches past the input (padding, or ceil mode); the
VGG case (2x2, stride 2, even sizes) reads the input itself. Folding the input
into (N, C, H/2, 2, W/2, 2) and reducing over the window axes was measured
slower than the strided views (NumPy and CuPy), so there is no separate reshape path.
MAX runs over blocks of images on all cores (vggcaffe.threads).
Bottom and top may be channels-last (vggcaffe.blob): every array the layer makes
follows y's layout, and `channels_last` (set by vggcaffe.cpu.prepare_net) makes the top so.
"""
import numpy as np

from ..backend import array_module
from ..proto import caffe_pb2
from ..threads import over_blocks
from .base import Layer, register

P = caffe_pb2.PoolingParameter


def pooled_size(size, kernel, stride, pad, ceil_mode, padded=None):
    """Caffe's output size: ceil((size + 2 pad - kernel) / stride) + 1, less the
    last window when it would start inside the bottom/right padding. Caffe makes
    that correction in both dimensions when either is padded (`padded`: pad_h or
    pad_w; default this dimension's pad)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if (pad > 0 if padded is None else padded) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register("Pooling", "POOLING")
class PoolingLayer(Layer):
    exact_num_bottom = 1
    min_top = 1
    max_top = 2          # MAX may emit its argmax mask as a second top

    def layer_setup(self, bottom, top):
        p = self.param.pooling_param
        if p.pool == P.STOCHASTIC:
            raise self.error("STOCHASTIC pooling is not implemented; use MAX or AVE")
        if len(top) > 1 and p.pool != P.MAX:
            raise self.error("only MAX pooling has a second (mask) top")
        self.pool = p.pool
        self.global_pooling = p.global_pooling
        self.kh, self.kw = self._pair(p, "kernel_size", "kernel_h", "kernel_w")
        self.sh, self.sw = self._pair(p, "stride", "stride_h", "stride_w")
        self.ph, self.pw = self._pair(p, "pad", "pad_h", "pad_w")
        self.ceil_mode = p.round_mode == P.CEIL
        # Set by vggcaffe.cpu.prepare_net; relu_mask: the bottom is the output of a ReLU
        # folded into a convolution, whose backward this MAX layer does: dY *= (Y > 0)
        # before routing (Y > 0 exactly where the routed-to bottom value is).
        self.channels_last = self.relu_mask = False
        self._masked_dy = None
        if self.global_pooling and (self.sh, self.sw, self.ph, self.pw) != (1, 1, 0, 0):
            raise self.error("global_pooling takes only stride 1 and pad 0")
        if self.sh < 1 or self.sw < 1:
            raise self.error(f"stride must be positive, got {self.sh}x{self.sw}")

    def _pair(self, p, both, h, w):
        """(h, w) from `both` or from the `h`/`w` fields, as Caffe reads them."""
        if both == "kernel_size" and self.global_pooling:
            if p.HasField(both) or p.HasField(h) or p.HasField(w):
                raise self.error("global_pooling takes no kernel size")
            return None, None
        if p.HasField(h) != p.HasField(w) or (p.HasField(h) and p.HasField(both)):
            raise self.error(f"give {both} or both {h} and {w}, not a mix")
        if both == "kernel_size" and not (p.HasField(both) or p.HasField(h)):
            raise self.error("kernel_size (or kernel_h and kernel_w) is required")
        return (getattr(p, h), getattr(p, w)) if p.HasField(h) else (getattr(p, both),) * 2

    def reshape(self, bottom, top):
        if len(bottom[0].shape) != 4:
            raise self.error(f"bottom must be 4-D (N, C, H, W), got shape {bottom[0].shape}")
        if bottom[0] in top:
            raise self.error("cannot work in place")
        N, C, H, W = bottom[0].shape
        if self.global_pooling:
            self.kh, self.kw = H, W
        if self.kh < 1 or self.kw < 1 or self.ph >= self.kh or self.pw >= self.kw:
            raise self.error(f"need kernel >= 1 and pad < kernel, got kernel {self.kh}x{self.kw} "
                             f"pad {self.ph}x{self.pw}")
        padded = self.ph > 0 or self.pw > 0
        self.oh = pooled_size(H, self.kh, self.sh, self.ph, self.ceil_mode, padded)
        self.ow = pooled_size(W, self.kw, self.sw, self.pw, self.ceil_mode, padded)
        if self.oh < 1 or self.ow < 1:
            raise self.error(f"kernel {self.kh}x{self.kw} does not fit the {H}x{W} input "
                             f"(pad {self.ph}x{self.pw})")
        self.window_size = self._window_size(H, W)        # (oh, ow), host ints
        for blob in top:
            blob.reshape(N, C, self.oh, self.ow)
        if self.channels_last:
            top[0].make_channels_last()

    # --- windows ----------------------------------------------------------
    def _padded_shape(self, H, W):
        """Rows/columns of a buffer holding the whole input at (ph, pw) and every window."""
        hp = max(self.sh * (self.oh - 1) + self.kh, self.ph + H)
        wp = max(self.sw * (self.ow - 1) + self.kw, self.pw + W)
        return hp, wp

    def _needs_padding(self, H, W):
        return self._padded_shape(H, W) != (H, W)

    def _offsets(self, a):
        """(k, view) per kernel offset (i, j), k = i*kw + j in Caffe's scan order;
        view[n, c, y, x] = a[n, c, y*sh + i, x*sw + j], shape (N, C, oh, ow)."""
        for i in range(self.kh):
            for j in range(self.kw):
                yield i * self.kw + j, a[:, :, i:i + self.sh * (self.oh - 1) + 1:self.sh,
                                         j:j + self.sw * (self.ow - 1) + 1:self.sw]

    def _pad(self, xp, x, fill):
        """x (N, C, H, W) placed at (ph, pw) in a buffer filled with `fill`."""
        N, C, H, W = x.shape
        if not self._needs_padding(H, W):
            return x
        buf = xp.full((N, C) + self._padded_shape(H, W), fill, x.dtype)
        buf[:, :, self.ph:self.ph + H, self.pw:self.pw + W] = x
        return buf

    def _window_size(self, H, W):
        """AVE divisor (oh, ow): windows clipped to the padded input, as Caffe."""
        hs = np.arange(self.oh) * self.sh - self.ph
        ws = np.arange(self.ow) * self.sw - self.pw
        rows = np.minimum(hs + self.kh, H + self.ph) - hs
        cols = np.minimum(ws + self.kw, W + self.pw) - ws
        return np.outer(rows, cols)

    # --- forward / backward ------------------------------------------------
    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data                  # (N, C, H, W), (N, C, oh, ow)
        xp = array_module(x)
        if self.pool == P.MAX:
            self.argmax = xp.empty_like(y, np.min_scalar_type(self.kh * self.kw - 1))   # (N, C, oh, ow)
            over_blocks(xp, lambda n0, n1: self._max_forward(xp, x[n0:n1], y[n0:n1], self.argmax[n0:n1]),
                        x.shape[0], x.size)
            if len(top) > 1:
                top[1].data[...] = self._mask(xp, x.shape)
        else:
            self._ave_forward(xp, x, y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff                                     # (N, C, oh, ow)
        xp = array_module(dy)
        N, C, H, W = bottom[0].shape
        tiled = (self.kh, self.kw) == (self.sh, self.sw) and (self.oh * self.sh, self.ow * self.sw) == (H, W)
        if self._needs_padding(H, W):
            dx = xp.zeros((N, C) + self._padded_shape(H, W), dy.dtype)
        else:
            dx = bottom[0].diff
            if not (tiled and self.pool == P.MAX):      # there MAX's backward writes every element
                dx.fill(0)
        if self.pool == P.MAX:
            y = top[0].data if self.relu_mask else None
            if y is not None and (self._masked_dy is None or self._masked_dy.strides != dy.strides
                                  or self._masked_dy.shape != dy.shape):
                self._masked_dy = xp.empty_like(dy)

            def block(n0, n1):
                if y is None:
                    self._max_backward(xp, dx[n0:n1], dy[n0:n1], self.argmax[n0:n1])
                else:
                    masked = xp.multiply(dy[n0:n1], y[n0:n1] > 0, out=self._masked_dy[n0:n1])
                    self._max_backward(xp, dx[n0:n1], masked, self.argmax[n0:n1])
            over_blocks(xp, block, N, dx.size)
        else:
            self._ave_backward(dx, dy / xp.asarray(self.window_size, dy.dtype))
        if dx is not bottom[0].diff:
            bottom[0].diff[...] = dx[:, :, self.ph:self.ph + H, self.pw:self.pw + W]

    def _max_forward(self, xp, x, y, argmax):
        """Running max into y, and into argmax the offset k of the first maximum (strictly
        greater replaces, so ties keep the earliest offset, as Caffe's scan)."""
        for k, view in self._offsets(self._pad(xp, x, -np.inf)):
            if k == 0:
                y[...] = view
                argmax.fill(0)
                continue
            better = view > y
            xp.maximum(y, view, out=y)
            # k grows with the loop, so "k where better" is a max with the old offset.
            xp.maximum(argmax, better * argmax.dtype.type(k), out=argmax)

    def _max_backward(self, xp, dx, dy, argmax):
        """Each output's gradient goes to its argmax (summed where windows overlap)."""
        overlap = self.sh < self.kh or self.sw < self.kw
        for k, view in self._offsets(dx):
            if overlap:
                view += dy * (argmax == k)
            else:
                xp.multiply(dy, argmax == k, out=view)

    def _mask(self, xp, shape):
        """Caffe's mask top: flat index h*W + w of each argmax in its input plane."""
        W = shape[3]
        i, j = self.argmax // self.kw, self.argmax % self.kw
        h0 = xp.arange(self.oh).reshape(-1, 1) * self.sh - self.ph
        w0 = xp.arange(self.ow) * self.sw - self.pw
        return (h0 + i) * W + (w0 + j)

    def _ave_forward(self, xp, x, y):
        """Window sums into y, divided by Caffe's clipped window size."""
        for k, view in self._offsets(self._pad(xp, x, 0)):
            if k == 0:
                y[...] = view
            else:
                y += view
        y /= xp.asarray(self.window_size, x.dtype)

    def _ave_backward(self, dx, dy_per_pixel):
        for _, view in self._offsets(dx):
            view += dy_per_pixel
