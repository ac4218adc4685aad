"""Convolution: forward against a loop reference, gradients, shapes and errors."""
import numpy as np
import pytest

from tests.gradient_check import check_gradient, make_layer
from vggcaffe.errors import VggcaffeError
from vggcaffe.layers import V1_TYPE_NAMES
from vggcaffe import threads
from vggcaffe.blob import is_channels_last
from vggcaffe.layers import convolution


def ref_conv(x, w, b, pad, stride, dilation, group):
    """Direct convolution: loops over groups, output pixels and kernel offsets."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    (ph, pw), (sh, sw), (dh, dw) = pad, stride, dilation
    xpad = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xpad[:, :, ph:ph + h, pw:pw + wd] = x
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, co, ho, wo))
    og = co // group
    for g in range(group):
        for r in range(ho):
            for q in range(wo):
                for i in range(kh):
                    for j in range(kw):
                        pixel = xpad[:, g * cg:(g + 1) * cg, r * sh + i * dh, q * sw + j * dw]   # (N, C/g)
                        y[:, g * og:(g + 1) * og, r, q] += pixel @ w[g * og:(g + 1) * og, :, i, j].T
    if b is not None:
        y += b[None, :, None, None]
    return y


def conv_text(params, bias=True):
    return (f'name: "conv" type: "Convolution" convolution_param {{ {params} bias_term: {str(bias).lower()} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }}')


# (prototxt params, bottom shape, pad, stride, dilation, group)
CASES = {
    "3x3 pad 1": ("num_output: 4 kernel_size: 3 pad: 1", (2, 3, 6, 5), (1, 1), (1, 1), (1, 1), 1),
    "3x3 wide (flat windows)": ("num_output: 3 kernel_size: 3 pad: 1", (2, 2, 4, 17), (1, 1), (1, 1), (1, 1), 1),
    "dilation 2 wide (flat windows)": ("num_output: 2 kernel_size: 3 pad: 2 dilation: 2", (1, 2, 3, 40),
                                       (2, 2), (1, 1), (2, 2), 1),
    "stride 2": ("num_output: 3 kernel_size: 3 stride: 2", (2, 3, 7, 8), (0, 0), (2, 2), (1, 1), 1),
    "dilation 2": ("num_output: 2 kernel_size: 3 pad: 2 dilation: 2", (1, 3, 6, 7), (2, 2), (1, 1), (2, 2), 1),
    "group 2": ("num_output: 4 kernel_size: 3 pad: 1 group: 2", (2, 4, 5, 5), (1, 1), (1, 1), (1, 1), 2),
    "_h/_w": ("num_output: 3 kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1",
              (2, 2, 7, 6), (1, 0), (2, 1), (1, 1), 1),
    "two values": ("num_output: 2 kernel_size: 3 kernel_size: 1 pad: 0 pad: 1 stride: 1 stride: 2 dilation: 2",
                   (1, 2, 7, 5), (0, 1), (1, 2), (2, 2), 1),
    "3x3 narrowing": ("num_output: 2 kernel_size: 3 pad: 1", (2, 4, 5, 6), (1, 1), (1, 1), (1, 1), 1),
    "2x3 stride 1": ("num_output: 2 kernel_h: 2 kernel_w: 3 pad_h: 0 pad_w: 1", (1, 3, 5, 4),
                     (0, 1), (1, 1), (1, 1), 1),
    "2x2 map": ("num_output: 3 kernel_size: 3 pad: 1", (2, 4, 2, 2), (1, 1), (1, 1), (1, 1), 1),
    "2x3 map stride 2": ("num_output: 2 kernel_size: 3 pad: 1 stride: 2", (1, 3, 2, 3), (1, 1), (2, 2), (1, 1), 1),
    "1x1": ("num_output: 5 kernel_size: 1", (2, 3, 4, 3), (0, 0), (1, 1), (1, 1), 1),
    "1x1 group 3": ("num_output: 6 kernel_size: 1 group: 3", (2, 3, 3, 3), (0, 0), (1, 1), (1, 1), 3),
    "1x1 stride 2": ("num_output: 2 kernel_size: 1 stride: 2", (1, 3, 5, 5), (0, 0), (2, 2), (1, 1), 1),
}


def run_forward(name, dtype, bias=True, seed=0):
    params, shape, pad, stride, dilation, group = CASES[name]
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    layer, bottom, top = make_layer(conv_text(params, bias), [x], dtype=dtype)
    layer.forward(bottom, top)
    b = layer.blobs[1].data.astype(np.float64) if bias else None
    ref = ref_conv(x.astype(np.float64), layer.blobs[0].data.astype(np.float64), b, pad, stride, dilation, group)
    return layer, top[0].data, ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference(name, dtype):
    _, y, ref = run_forward(name, dtype)
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


def test_wide_stride_1_maps_use_flat_windows():
    assert run_forward("3x3 wide (flat windows)", np.float64)[0].flat
    assert run_forward("dilation 2 wide (flat windows)", np.float64)[0].flat
    assert not run_forward("3x3 pad 1", np.float64)[0].flat


def test_forward_without_bias_has_one_blob():
    layer, y, ref = run_forward("3x3 pad 1", np.float64, bias=False)
    assert len(layer.blobs) == 1
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient(name):
    params, shape, *_ = CASES[name]
    x = np.random.default_rng(1).standard_normal(shape)
    layer, bottom, top = make_layer(conv_text(params), [x])
    check_gradient(layer, bottom, top)


def test_gradient_without_bias():
    params, shape, *_ = CASES["stride 2"]
    layer, bottom, top = make_layer(conv_text(params, bias=False), [np.random.default_rng(2).standard_normal(shape)])
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("name", ["3x3 pad 1", "3x3 wide (flat windows)", "group 2", "_h/_w", "1x1 group 3"])
def test_parallel_channel_blocks_match_serial(name, monkeypatch):
    params, shape, *_ = CASES[name]
    x = np.random.default_rng(3).standard_normal(shape)
    dy = None
    results = []
    for workers, threshold in ((1, 1 << 60), (3, 0)):
        monkeypatch.setattr(threads, "WORKERS", workers)
        monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", threshold)
        layer, bottom, top = make_layer(conv_text(params), [x])
        layer.forward(bottom, top)
        dy = np.random.default_rng(4).standard_normal(top[0].shape) if dy is None else dy
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append([top[0].data.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy()])
    for serial, parallel in zip(*results):
        np.testing.assert_allclose(parallel, serial, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["3x3 pad 1", "3x3 wide (flat windows)", "1x1"])
def test_batch_goes_through_in_slices_when_patches_are_large(name, monkeypatch):
    params, _, pad, stride, dilation, group = CASES[name]
    monkeypatch.setattr(convolution, "MAX_COLS_BYTES", 1)           # one image per pass
    x = np.random.default_rng(9).standard_normal((3,) + CASES[name][1][1:])
    layer, bottom, top = make_layer(conv_text(params), [x])
    assert layer.images_per_pass == 1
    layer.forward(bottom, top)
    ref = ref_conv(x, layer.blobs[0].data, layer.blobs[1].data, pad, stride, dilation, group)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12, atol=1e-12)
    check_gradient(layer, bottom, top)


def test_shapes_and_default_fillers():
    x = np.ones((2, 6, 9, 8))
    layer, _, top = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 '
                               'stride: 2 pad: 1 group: 2 }', [x])
    assert layer.blobs[0].shape == (4, 3, 3, 3) and layer.blobs[1].shape == (4,)
    assert top[0].shape == (2, 4, 5, 4)
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()
    assert V1_TYPE_NAMES["CONVOLUTION"] == "Convolution"


def test_backward_accumulates_params_and_overwrites_bottom_diff():
    params, shape, *_ = CASES["3x3 pad 1"]
    layer, bottom, top = make_layer(conv_text(params), [np.random.default_rng(5).standard_normal(shape)])
    layer.forward(bottom, top)
    top[0].diff[...] = np.random.default_rng(6).standard_normal(top[0].shape)
    layer.backward(top, [True], bottom)
    once = [bottom[0].diff.copy(), layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()]
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, once[0])
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once[1])
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * once[2])


def test_propagate_down_flags_are_respected():
    params, shape, *_ = CASES["1x1"]
    layer, bottom, top = make_layer(conv_text(params), [np.random.default_rng(7).standard_normal(shape)])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = 7
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7) and not layer.blobs[0].diff.any()
    np.testing.assert_allclose(layer.blobs[1].diff, np.full(5, 2 * 4 * 3))


def test_two_bottoms_share_the_weights():
    params, shape, pad, stride, dilation, group = CASES["stride 2"]
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal(shape), rng.standard_normal(shape)]
    layer, bottom, top = make_layer(conv_text(params), xs, n_tops=2)
    layer.forward(bottom, top)
    for x, t in zip(xs, top):
        ref = ref_conv(x, layer.blobs[0].data, layer.blobs[1].data, pad, stride, dilation, group)
        np.testing.assert_allclose(t.data, ref, rtol=1e-12, atol=1e-12)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("params, shape, message", [
    ("num_output: 2", (1, 1, 4, 4), "kernel_size .* is required"),
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 1, 4, 4), "either kernel_size or both"),
    ("num_output: 2 kernel_h: 3", (1, 1, 4, 4), "either kernel_size or both"),
    ("num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 1, 4, 4), "takes 1 or 2"),
    ("num_output: 2 kernel_size: 3 stride: 0", (1, 1, 4, 4), "stride must be positive"),
    ("num_output: 3 kernel_size: 1 group: 2", (1, 2, 4, 4), "divisible by group"),
    ("kernel_size: 3", (1, 1, 4, 4), "num_output"),
    ("num_output: 2 kernel_size: 5", (1, 1, 4, 4), "larger than the padded input"),
    ("num_output: 2 kernel_size: 3", (1, 1, 4, 4, 4), "4-D"),
    ("num_output: 2 kernel_size: 3 axis: 2", (1, 1, 4, 4), "axis 1 only"),
])
def test_bad_parameters_name_the_layer(params, shape, message):
    with pytest.raises(VggcaffeError, match=f"layer 'c' \\(Convolution\\): .*{message}"):
        make_layer(f'name: "c" type: "Convolution" convolution_param {{ {params} }}', [np.zeros(shape)])


def test_channel_change_on_reshape_is_an_error():
    layer, bottom, top = make_layer(conv_text("num_output: 2 kernel_size: 1"), [np.zeros((1, 3, 4, 4))])
    bottom[0].reshape(1, 4, 4, 4)
    with pytest.raises(VggcaffeError, match="conv"):
        layer.reshape(bottom, top)


NHWC_CASES = ["3x3 pad 1", "3x3 wide (flat windows)", "dilation 2 wide (flat windows)", "stride 2", "dilation 2",
              "_h/_w", "two values", "3x3 narrowing", "2x3 stride 1", "2x2 map", "2x3 map stride 2"]


@pytest.fixture(params=[False, True], ids=["nchw", "nhwc"])
def layout(request, monkeypatch):
    """Run the test once per CPU layout, forced; yields whether it is NHWC."""
    monkeypatch.setattr(convolution, "FORCE_NHWC", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NHWC_CASES)
def test_both_layouts_forward_match_reference(name, dtype, layout):
    layer, y, ref = run_forward(name, dtype)
    assert layer.nhwc == layout and layer.keep_cols != layout     # NHWC layers rebuild their patches
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NHWC_CASES)
@pytest.mark.parametrize("keep_cols", [False, True], ids=["rebuilt cols", "kept cols"])
def test_both_layouts_gradient(name, keep_cols, layout, monkeypatch):
    monkeypatch.setattr(convolution, "MAX_CACHED_COLS_BYTES", 1 << 30 if keep_cols else 0)
    params, shape, *_ = CASES[name]
    layer, bottom, top = make_layer(conv_text(params), [np.random.default_rng(1).standard_normal(shape)])
    assert layer.nhwc == layout and layer.keep_cols == (keep_cols and not layout)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("name", NHWC_CASES)
@pytest.mark.parametrize("fused_relu", [False, True], ids=["conv", "conv+relu"])
def test_channels_last_blobs_and_fused_relu(name, fused_relu, layout):
    """Bottom and top channels-last (as vggcaffe.cpu.prepare_net makes them), with and
    without the folded ReLU: the plain layer's output (through a ReLU), and gradients."""
    params, shape, *_ = CASES[name]
    x = np.random.default_rng(5).standard_normal(shape)
    plain, plain_bottom, plain_top = make_layer(conv_text(params), [x])
    plain.forward(plain_bottom, plain_top)
    layer, bottom, top = make_layer(conv_text(params), [x])
    layer.channels_last, layer.fused_relu = True, fused_relu
    bottom[0].make_channels_last()
    bottom[0].data[...] = x
    layer.reshape(bottom, top)
    assert is_channels_last(top[0].data) and is_channels_last(top[0].diff)
    layer.forward(bottom, top)
    ref = np.maximum(plain_top[0].data, 0) if fused_relu else plain_top[0].data
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12, atol=1e-12)
    check_gradient(layer, bottom, top)


def test_transposed_data_gradient_applies_to_stride_1_from_4x4_maps_without_more_outputs(monkeypatch):
    assert run_forward("dilation 2", np.float64)[0].transposed_pad is None         # NCHW layout
    monkeypatch.setattr(convolution, "FORCE_NHWC", True)
    # "3x3 pad 1" has more outputs than inputs (4 > 3): dY's patches would outgrow X's.
    for name, expected in (("dilation 2", (2, 2)), ("3x3 narrowing", (1, 1)), ("2x3 stride 1", (1, 1)),
                           ("3x3 pad 1", None), ("stride 2", None),
                           ("dilation 2 wide (flat windows)", None), ("two values", None)):
        params, shape, *_ = CASES[name]
        layer, _, _ = make_layer(conv_text(params), [np.zeros(shape)])
        assert layer.transposed_pad == expected, name


def test_nhwc_without_bias_and_in_slices(monkeypatch):
    monkeypatch.setattr(convolution, "FORCE_NHWC", True)
    monkeypatch.setattr(convolution, "MAX_COLS_BYTES", 1)
    params, shape, *_ = CASES["stride 2"]
    layer, bottom, top = make_layer(conv_text(params, bias=False), [np.random.default_rng(2).standard_normal(shape)])
    assert layer.nhwc and layer.images_per_pass == 1 and not layer.keep_cols
    check_gradient(layer, bottom, top)


def test_nhwc_does_not_apply_to_groups_or_1x1(monkeypatch):
    monkeypatch.setattr(convolution, "FORCE_NHWC", True)
    assert not run_forward("group 2", np.float64)[0].nhwc
    assert not run_forward("1x1", np.float64)[0].nhwc


def test_rule_picks_nhwc_for_many_channels_on_small_maps():
    assert convolution.use_nhwc(256, 4) and convolution.use_nhwc(512, 14) and convolution.use_nhwc(32, 16)
    assert not convolution.use_nhwc(3, 8) and not convolution.use_nhwc(16, 8) and not convolution.use_nhwc(64, 112)


def backward_grads(layer, bottom, top, dy):
    for b in layer.blobs:
        b.diff[...] = 0
    for t in top:
        t.diff[...] = dy
    layer.backward(top, [True] * len(bottom), bottom)
    return [b.diff.copy() for b in bottom] + [b.diff.copy() for b in layer.blobs]


def grads_after_another_forward(name, seed, dy_shape, before_backward):
    """(layer, expected, got): the gradients for x2 right after its forward, and again after
    a forward on x1, x2 put back, and before_backward(layer, bottom, top)."""
    params, shape, *_ = CASES[name]
    rng = np.random.default_rng(seed)
    x1, x2, dy = rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(dy_shape)
    layer, bottom, top = make_layer(conv_text(params), [x2])
    layer.forward(bottom, top)
    expected = backward_grads(layer, bottom, top, dy)
    bottom[0].data[...] = x1
    layer.forward(bottom, top)
    bottom[0].data[...] = x2
    before_backward(layer, bottom, top)
    return layer, expected, backward_grads(layer, bottom, top, dy)


def test_kept_cols_follow_the_last_forward(layout):
    layer, expected, got = grads_after_another_forward("3x3 pad 1", 10, (2, 4, 6, 5),
                                                       lambda layer, bottom, top: layer.forward(bottom, top))
    assert got[1].any()
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    assert layer.keep_cols != layout


def test_kept_cols_are_per_bottom(layout):
    params, shape, *_ = CASES["dilation 2"]
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(shape), rng.standard_normal(shape)]
    layer, bottom, top = make_layer(conv_text(params), xs, n_tops=2)
    assert layer.keep_cols != layout
    dy = rng.standard_normal(top[0].shape)
    layer.forward(bottom, top)
    both = backward_grads(layer, bottom, top, dy)
    alone = []
    for x in xs:
        single, b1, t1 = make_layer(conv_text(params), [x])
        single.blobs[0].data[...] = layer.blobs[0].data
        single.forward(b1, t1)
        alone.append(backward_grads(single, b1, t1, dy))
    np.testing.assert_allclose(both[0], alone[0][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(both[1], alone[1][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(both[2], alone[0][1] + alone[1][1], rtol=1e-12, atol=1e-12)
    check_gradient(layer, bottom, top)


def test_reshape_drops_kept_cols(layout):
    _, expected, got = grads_after_another_forward("stride 2", 12, (2, 3, 3, 3),
                                                   lambda layer, bottom, top: layer.reshape(bottom, top))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_only_nchw_layers_of_train_nets_keep_patches_for_the_backward(layout):
    params, shape, *_ = CASES["3x3 pad 1"]
    assert make_layer(conv_text(params), [np.zeros(shape)])[0].keep_cols != layout
    assert not make_layer(conv_text(params), [np.zeros(shape)], phase="TEST")[0].keep_cols


def test_maps_smaller_than_the_kernel_run_as_one_dense_matrix(monkeypatch):
    monkeypatch.setattr(convolution, "FORCE_NHWC", True)
    for name, dense in (("2x2 map", True), ("2x3 map stride 2", True), ("3x3 pad 1", False), ("stride 2", False)):
        params, shape, *_ = CASES[name]
        layer = make_layer(conv_text(params), [np.zeros(shape)])[0]
        assert layer.dense == dense, name
    # 2x2 input, 3x3 kernel, pad 1: each of the 4 outputs reads all 4 inputs.
    assert len(make_layer(conv_text(CASES["2x2 map"][0]), [np.zeros((2, 4, 2, 2))])[0].dense_taps) == 16
