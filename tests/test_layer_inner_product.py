"""InnerProduct: forward against a loop reference (axis, transpose, no bias), gradients, errors."""
import numpy as np
import pytest

from tests.gradient_check import check_gradient, make_layer
from vggcaffe.errors import VggcaffeError
from vggcaffe.layers import V1_TYPE_NAMES
from vggcaffe.layers.base import add_sums


def ref_inner_product(x, w, b, axis, transpose):
    """y[m, o] = sum_k x[m, k] w[o, k] (+ b[o]), with loops over m and o."""
    m = int(np.prod(x.shape[:axis]))
    xm = x.reshape(m, -1)
    w = w.T if transpose else w                       # (N_out, K)
    y = np.zeros((m, w.shape[0]))
    for i in range(m):
        for o in range(w.shape[0]):
            y[i, o] = sum(xm[i, k] * w[o, k] for k in range(xm.shape[1])) + (b[o] if b is not None else 0)
    return y.reshape(x.shape[:axis] + (w.shape[0],))


def ip_text(num_output=3, axis=1, transpose=False, bias=True):
    return (f'name: "fc" type: "InnerProduct" inner_product_param {{ num_output: {num_output} axis: {axis} '
            f'transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }}')


# (bottom shape, axis, transpose, bias, expected weight shape, expected top shape)
CASES = [
    ((2, 3, 2, 2), 1, False, True, (3, 12), (2, 3)),
    ((2, 3, 2, 2), 1, True, True, (12, 3), (2, 3)),
    ((2, 3, 2, 2), 2, False, True, (3, 4), (2, 3, 3)),
    ((2, 3, 2, 2), -1, True, False, (2, 3), (2, 3, 2, 3)),
    ((4, 5), 1, False, False, (3, 5), (4, 3)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, transpose, bias, w_shape, top_shape", CASES)
def test_forward_matches_reference(shape, axis, transpose, bias, w_shape, top_shape, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    layer, bottom, top = make_layer(ip_text(axis=axis, transpose=transpose, bias=bias), [x], dtype=dtype)
    assert layer.blobs[0].shape == w_shape and len(layer.blobs) == 1 + bias
    layer.forward(bottom, top)
    assert top[0].shape == top_shape and top[0].data.dtype == dtype
    b = layer.blobs[1].data.astype(np.float64) if bias else None
    ref = ref_inner_product(x.astype(np.float64), layer.blobs[0].data.astype(np.float64), b, axis % x.ndim, transpose)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("shape, axis, transpose, bias, w_shape, top_shape", CASES)
def test_gradient(shape, axis, transpose, bias, w_shape, top_shape):
    x = np.random.default_rng(1).standard_normal(shape)
    layer, bottom, top = make_layer(ip_text(axis=axis, transpose=transpose, bias=bias), [x])
    check_gradient(layer, bottom, top)


def test_weight_is_num_output_by_chw():
    x = np.random.default_rng(2).standard_normal((2, 3, 2, 2))
    layer, bottom, top = make_layer(ip_text(num_output=1, bias=False), [x])
    layer.blobs[0].data[...] = 0
    layer.blobs[0].data[0, 1 * 4 + 0 * 2 + 1] = 1          # picks x[:, c=1, h=0, w=1]
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data[:, 0], x[:, 1, 0, 1])
    assert V1_TYPE_NAMES["INNER_PRODUCT"] == "InnerProduct"


def test_backward_accumulates_params():
    layer, bottom, top = make_layer(ip_text(), [np.random.default_rng(3).standard_normal((2, 4))])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[1].diff, np.full(3, 4.0))
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * np.tile(bottom[0].data.sum(axis=0), (3, 1)))


def test_input_size_change_is_an_error():
    layer, bottom, top = make_layer(ip_text(), [np.zeros((2, 3, 2, 2))])
    bottom[0].reshape(2, 3, 3, 2)
    with pytest.raises(VggcaffeError, match="layer 'fc' .*18 inputs.*take 12"):
        layer.reshape(bottom, top)


def test_bad_axis_and_num_output():
    with pytest.raises(VggcaffeError, match="axis 4 is out of range"):
        make_layer(ip_text(axis=4), [np.zeros((2, 3, 2, 2))])
    with pytest.raises(VggcaffeError, match="num_output must be positive"):
        make_layer(ip_text(num_output=0), [np.zeros((2, 3))])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_sums_by_gemv_match_numpy_and_accumulate(dtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((700, 12)).astype(dtype)
    for view, axis in [(a, 0), (a, 1), (a.T, 0), (a.T, 1), (a[::2, 3:], 0)]:
        out = np.ones(view.shape[1 - axis], dtype)
        add_sums(view, out, axis)
        add_sums(view, out, axis)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(out, 1 + 2 * view.astype(np.float64).sum(axis=axis), rtol=tol, atol=tol * 30)
