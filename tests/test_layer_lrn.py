"""LRN: both norm regions against Caffe's ReferenceLRNForward loops, gradients."""
import numpy as np
import pytest

from tests.gradient_check import check_gradient, make_layer
from vggcaffe.errors import VggcaffeError


def ref_lrn(x, n, alpha, beta, k, across):
    """test_lrn_layer.cpp's reference, with k instead of its fixed 1 across channels (within
    a channel Caffe's layer ignores k: its Power layer's shift is 1)."""
    N, C, H, W = x.shape
    y = np.zeros(x.shape)
    pre = (n - 1) // 2
    for b, c, h, w in np.ndindex(x.shape):
        scale = k if across else 1.0
        if across:
            for i in range(max(c - pre, 0), min(c - pre + n, C)):
                scale += x[b, i, h, w] ** 2 * alpha / n
        else:
            for i in range(max(h - pre, 0), min(h - pre + n, H)):
                for j in range(max(w - pre, 0), min(w - pre + n, W)):
                    scale += x[b, c, i, j] ** 2 * alpha / (n * n)
        y[b, c, h, w] = x[b, c, h, w] * scale ** -beta
    return y


def lrn_text(n, alpha, beta, k, across):
    region = "ACROSS_CHANNELS" if across else "WITHIN_CHANNEL"
    return (f'name: "norm1" type: "LRN" lrn_param {{ local_size: {n} alpha: {alpha} beta: {beta} '
            f"k: {k} norm_region: {region} }}")


# (local_size, alpha, beta, k): AlexNet's defaults with k 1, and the paper's A-LRN in Caffe
# terms (alpha 0.0005 = 1e-4 * 5, k 2); large alphas so the normalisation really bites.
PARAMS = [(5, 1e-4, 0.75, 1.0), (5, 5e-4, 0.75, 2.0), (3, 0.8, 0.6, 1.5), (1, 2.0, 0.75, 1.0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("params", PARAMS)
def test_forward_matches_reference(params, across, dtype):
    n, alpha, beta, k = params
    x = (np.random.default_rng(0).standard_normal((2, 7, 5, 6)) * 3).astype(dtype)
    layer, bottom, top = make_layer(lrn_text(n, alpha, beta, k, across), [x], dtype=dtype)
    layer.forward(bottom, top)
    f32 = np.float32
    expected = ref_lrn(x.astype(np.float64), n, f32(alpha), f32(beta), f32(k), across)
    assert top[0].data.dtype == dtype
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 0)
    if alpha > 0.1:
        assert np.abs(expected / x - 1).max() > 0.1                 # the case is not an identity


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("params", PARAMS[1:])
def test_gradient(params, across):
    n, alpha, beta, k = params
    x = np.random.default_rng(1).standard_normal((2, 7, 5, 4)) * 2
    layer, bottom, top = make_layer(lrn_text(n, alpha, beta, k, across), [x])
    check_gradient(layer, bottom, top, stepsize=1e-5, threshold=1e-7)


def test_even_local_size_is_an_error():
    with pytest.raises(VggcaffeError, match="'norm1'.*odd"):
        make_layer(lrn_text(4, 1e-4, 0.75, 1, True), [np.zeros((1, 6, 3, 3))])


def test_in_place_is_an_error():
    layer, bottom, _ = make_layer(lrn_text(5, 1e-4, 0.75, 1, True), [np.zeros((1, 6, 3, 3))])
    with pytest.raises(VggcaffeError, match="in place"):
        layer.reshape(bottom, bottom)


def test_bottom_must_be_4d():
    with pytest.raises(VggcaffeError, match="4-D"):
        make_layer(lrn_text(5, 1e-4, 0.75, 1, True), [np.zeros((2, 6))])
