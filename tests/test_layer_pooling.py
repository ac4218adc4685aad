"""Pooling: forward against Caffe's window loops, argmax routing, gradients."""
import math

import numpy as np
import pytest

from tests.gradient_check import check_gradient, make_layer
from vggcaffe import threads
from vggcaffe.blob import is_channels_last
from vggcaffe.errors import VggcaffeError


def ref_size(size, k, s, p, ceil_mode=True, padded=None):
    """pooling_layer.cpp's Reshape; `padded`: pad_h || pad_w (default p > 0)."""
    rounding = math.ceil if ceil_mode else math.floor
    out = int(rounding(float(size + 2 * p - k) / s)) + 1
    if (p > 0 if padded is None else padded) and (out - 1) * s >= size + p:
        out -= 1
    return out


def ref_pool(x, kh, kw, sh, sw, ph, pw, pool, ceil_mode=True):
    """pooling_layer.cpp, element by element. Returns (top, mask)."""
    N, C, H, W = x.shape
    padded = ph > 0 or pw > 0
    oh, ow = ref_size(H, kh, sh, ph, ceil_mode, padded), ref_size(W, kw, sw, pw, ceil_mode, padded)
    y = np.zeros((N, C, oh, ow))
    mask = -np.ones((N, C, oh, ow), int)
    for n in range(N):
        for c in range(C):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * sh - ph, j * sw - pw
                    if pool == "MAX":
                        best = -np.inf
                        for h in range(max(hs, 0), min(hs + kh, H)):
                            for w in range(max(ws, 0), min(ws + kw, W)):
                                if x[n, c, h, w] > best:
                                    best, mask[n, c, i, j] = x[n, c, h, w], h * W + w
                        y[n, c, i, j] = best
                    else:
                        he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                        size = (he - hs) * (we - ws)
                        total = 0.0
                        for h in range(max(hs, 0), min(he, H)):
                            for w in range(max(ws, 0), min(we, W)):
                                total += x[n, c, h, w]
                        y[n, c, i, j] = total / size
    return y, mask


def ref_max_backward(x_shape, mask, dy):
    dx = np.zeros(x_shape)
    N, C, H, W = x_shape
    for n, c, i, j in np.ndindex(dy.shape):
        dx[n, c, mask[n, c, i, j] // W, mask[n, c, i, j] % W] += dy[n, c, i, j]
    return dx


def param_text(pool, kh, kw, sh, sw, ph, pw, ceil_mode=True):
    text = f'name: "pool" type: "Pooling" pooling_param {{ pool: {pool} '
    text += f"kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} "
    return text + ("" if ceil_mode else "round_mode: FLOOR ") + "}"


def distinct(shape, seed=0):
    """Values with gaps of 0.1, so no max-pool ties and no kinks in finite differences."""
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 3.0


# (H, W, kh, kw, sh, sw, ph, pw, ceil): VGG 2x2/2; 7x7 -> 4x4 under ceil; pad + ceil
# where the last window is dropped (5 -> 3); overlapping 3x3/2 with pad; non-square;
# stride past the kernel; floor mode; padded rows only, where the correction still drops
# the last column (Caffe makes it in both dimensions when either is padded).
CASES = [
    (6, 5, 2, 1, 2, 3, 1, 0, True),
    (6, 8, 2, 2, 2, 2, 0, 0, True),
    (7, 7, 2, 2, 2, 2, 0, 0, True),
    (5, 5, 2, 2, 2, 2, 1, 1, True),
    (7, 9, 3, 3, 2, 2, 1, 1, True),
    (6, 7, 3, 2, 2, 1, 1, 0, True),
    (8, 7, 2, 2, 3, 3, 0, 0, True),
    (7, 7, 2, 2, 2, 2, 0, 0, False),
    (7, 6, 3, 3, 2, 2, 1, 1, False),
]


def test_output_sizes_follow_caffe():
    assert ref_size(7, 2, 2, 0) == 4 and ref_size(7, 2, 2, 0, False) == 3
    assert ref_size(5, 2, 2, 1) == 3          # ceil gives 4; the last window starts in the padding
    _, _, top = make_layer(param_text("MAX", 2, 2, 2, 2, 1, 1), [np.zeros((1, 1, 5, 5))])
    assert top[0].shape == (1, 1, 3, 3)
    _, _, top = make_layer(param_text("MAX", 2, 2, 2, 2, 0, 0), [np.zeros((1, 1, 7, 7))])
    assert top[0].shape == (1, 1, 4, 4)
    assert ref_size(5, 1, 3, 0, padded=True) == 2 and ref_size(5, 1, 3, 0) == 3
    _, _, top = make_layer(param_text("MAX", 2, 1, 2, 3, 1, 0), [np.zeros((1, 1, 6, 5))])
    assert top[0].shape == (1, 1, 4, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, pool, dtype):
    H, W, kh, kw, sh, sw, ph, pw, ceil_mode = case
    x = distinct((2, 3, H, W)).astype(dtype)
    n_tops = 2 if pool == "MAX" else 1
    layer, bottom, top = make_layer(param_text(pool, kh, kw, sh, sw, ph, pw, ceil_mode), [x],
                                    dtype=dtype, n_tops=n_tops)
    layer.forward(bottom, top)
    y, mask = ref_pool(x.astype(np.float64), kh, kw, sh, sw, ph, pw, pool, ceil_mode)
    assert top[0].data.dtype == dtype
    np.testing.assert_allclose(top[0].data, y, rtol=1e-6 if dtype == np.float32 else 1e-13)
    if pool == "MAX":
        np.testing.assert_array_equal(top[1].data, mask)


@pytest.mark.parametrize("case", CASES)
def test_max_backward_routes_ties_to_first_maximum(case):
    H, W, kh, kw, sh, sw, ph, pw, ceil_mode = case
    x = np.random.default_rng(1).integers(0, 3, (2, 2, H, W)).astype(np.float64)   # many ties
    layer, bottom, top = make_layer(param_text("MAX", kh, kw, sh, sw, ph, pw, ceil_mode), [x])
    layer.forward(bottom, top)
    dy = np.random.default_rng(2).standard_normal(top[0].shape)
    top[0].diff[...] = dy
    bottom[0].diff[...] = np.nan                              # backward must overwrite
    layer.backward(top, [True], bottom)
    _, mask = ref_pool(x, kh, kw, sh, sw, ph, pw, "MAX", ceil_mode)
    np.testing.assert_allclose(bottom[0].diff, ref_max_backward(x.shape, mask, dy), rtol=1e-14)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("case", CASES)
def test_gradient(case, pool):
    H, W, kh, kw, sh, sw, ph, pw, ceil_mode = case
    layer, bottom, top = make_layer(param_text(pool, kh, kw, sh, sw, ph, pw, ceil_mode),
                                    [distinct((2, 2, H, W), seed=3)])
    assert check_gradient(layer, bottom, top, stepsize=1e-6, threshold=1e-7) > 0


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_global_pooling(pool):
    x = distinct((2, 3, 5, 4))
    layer, bottom, top = make_layer(f'name: "g" type: "Pooling" pooling_param {{ pool: {pool} '
                                    "global_pooling: true }", [x])
    layer.forward(bottom, top)
    expected = x.max(axis=(2, 3)) if pool == "MAX" else x.mean(axis=(2, 3))
    np.testing.assert_allclose(top[0].data, expected[:, :, None, None], rtol=1e-13)
    check_gradient(layer, bottom, top, threshold=1e-7)


def test_square_parameters_apply_to_both_axes():
    x = distinct((1, 2, 9, 9))
    layer, bottom, top = make_layer('name: "p" type: "Pooling" pooling_param { pool: AVE '
                                    "kernel_size: 3 stride: 2 pad: 1 }", [x])
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, ref_pool(x, 3, 3, 2, 2, 1, 1, "AVE")[0], rtol=1e-13)


@pytest.mark.parametrize("params", [
    "pool: STOCHASTIC kernel_size: 2",
    "pool: MAX",
    "pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2",
    "pool: MAX kernel_h: 2",
    "pool: MAX kernel_size: 2 pad: 2",
    "pool: MAX kernel_size: 2 stride: 0",
    "pool: MAX global_pooling: true kernel_size: 2",
    "pool: AVE global_pooling: true stride: 2",
    "pool: MAX kernel_size: 9",
])
def test_bad_parameters_name_the_layer(params):
    with pytest.raises(VggcaffeError, match="'pool1'"):
        make_layer(f'name: "pool1" type: "Pooling" pooling_param {{ {params} }}', [np.zeros((1, 1, 4, 4))])


def test_ave_has_no_mask_top():
    with pytest.raises(VggcaffeError, match="mask"):
        make_layer(param_text("AVE", 2, 2, 2, 2, 0, 0), [np.zeros((1, 1, 4, 4))], n_tops=2)


def test_in_place_is_an_error():
    layer, bottom, _ = make_layer(param_text("MAX", 2, 2, 2, 2, 0, 0), [np.zeros((1, 1, 4, 4))])
    with pytest.raises(VggcaffeError, match="in place"):
        layer.reshape(bottom, bottom)


@pytest.mark.parametrize("case", CASES)
def test_max_on_channels_last_blobs_in_parallel_blocks(case, monkeypatch):
    monkeypatch.setattr(threads, "WORKERS", 2)
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 0)
    H, W, kh, kw, sh, sw, ph, pw, ceil_mode = case
    x = np.random.default_rng(4).integers(0, 3, (3, 4, H, W)).astype(np.float64)   # many ties
    layer, bottom, top = make_layer(param_text("MAX", kh, kw, sh, sw, ph, pw, ceil_mode), [x])
    layer.channels_last = True
    bottom[0].make_channels_last()
    bottom[0].data[...] = x
    layer.reshape(bottom, top)
    assert is_channels_last(top[0].data) and is_channels_last(bottom[0].diff)
    layer.forward(bottom, top)
    y, mask = ref_pool(x, kh, kw, sh, sw, ph, pw, "MAX", ceil_mode)
    np.testing.assert_array_equal(top[0].data, y)
    dy = np.random.default_rng(5).standard_normal(top[0].shape)
    top[0].diff[...] = dy
    bottom[0].diff[...] = np.nan                              # backward must overwrite
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, ref_max_backward(x.shape, mask, dy), rtol=1e-14)
