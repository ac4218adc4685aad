"""Net construction and running: rules, in-place tops, fan-out, sharing, loss weights, backward pruning."""
import numpy as np
import pytest

from vggcaffe.errors import VggcaffeError
from vggcaffe.net import Net
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text

HEAD = """
force_backward: true
layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
"""


def ip(name, bottom, top, n=2, extra=""):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {extra} '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')


def euclid(name, a, b, extra=""):
    return f'layer {{ name: "{name}" type: "EuclideanLoss" bottom: "{a}" bottom: "{b}" top: "{name}" {extra} }}\n'


def build(text, phase="TRAIN", **kw):
    return Net(parse_text(text, caffe_pb2.NetParameter()), phase=phase, dtype=np.float64, seed=3, **kw)


def feed(net, seed=0):
    rs = np.random.default_rng(seed)
    net.blobs["x"].data[...] = rs.standard_normal(net.blobs["x"].shape)
    net.blobs["t"].data[...] = rs.standard_normal(net.blobs["t"].shape)


def numeric_input_grad(net, eps=1e-6):
    x = net.blobs["x"].data
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        plus = net.forward_loss()
        x[idx] = old - eps
        minus = net.forward_loss()
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * eps)
    return grad


def analytic_input_grad(net):
    net.forward_loss()
    net.clear_param_diffs()
    net.backward_all()
    return net.blobs["x"].diff.copy()


def test_include_exclude_rules():
    text = """
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 } } include { phase: TRAIN } }
    layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 1 } } exclude { phase: TRAIN } }
    layer { name: "c" type: "Input" top: "c" input_param { shape { dim: 1 } } include { min_level: 2 } }
    layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } include { max_level: 1 } }
    layer { name: "e" type: "Input" top: "e" input_param { shape { dim: 1 } } include { stage: "s1" stage: "s2" } }
    layer { name: "f" type: "Input" top: "f" input_param { shape { dim: 1 } } include { not_stage: "s1" } }
    layer { name: "g" type: "Input" top: "g" input_param { shape { dim: 1 } } include { stage: "s3" } include { phase: TEST } }
    """
    names = lambda net: list(net.layer_dict)
    assert names(build(text, "TRAIN")) == ["a", "d", "f"]
    assert names(build(text, "TEST")) == ["b", "d", "f", "g"]
    assert names(build(text, "TRAIN", level=2, stages=["s1", "s2"])) == ["a", "c", "e"]
    assert names(build(text, "TRAIN", level=1, stages=["s3"])) == ["a", "d", "f", "g"]


def test_include_and_exclude_together_is_an_error():
    text = 'layer { name: "a" type: "Input" top: "a" include { phase: TRAIN } exclude { phase: TEST } }'
    with pytest.raises(VggcaffeError, match="both include and exclude"):
        build(text)


def test_in_place_top_is_the_bottom_blob():
    net = build(HEAD + ip("fc", "x", "h") + 'layer { name: "r" type: "ReLU" bottom: "h" top: "h" }\n'
                + euclid("loss", "h", "t"))
    assert net._tops[2][0] is net._bottoms[2][0] is net.blobs["h"]
    feed(net)
    np.testing.assert_allclose(analytic_input_grad(net), numeric_input_grad(net), rtol=1e-6, atol=1e-8)


def test_fan_out_gradients_are_summed():
    text = HEAD + ip("fc1", "x", "a") + ip("fc2", "x", "b") + euclid("l1", "a", "t") + euclid("l2", "b", "t")
    net = build(text)
    assert any(l.type == "Split" for l in net.layers)
    assert "x" in net.blobs and not any("split" in k for k in net.blobs)
    feed(net)
    np.testing.assert_allclose(analytic_input_grad(net), numeric_input_grad(net), rtol=1e-6, atol=1e-8)


def test_loss_weight_scales_loss_and_gradient():
    base = HEAD + ip("fc", "x", "h")
    net1 = build(base + euclid("loss", "h", "t"))
    net2 = build(base + euclid("loss", "h", "t", "loss_weight: 2.5"))
    feed(net1)
    feed(net2)
    assert net2.forward_loss() == pytest.approx(2.5 * net1.forward_loss())
    np.testing.assert_allclose(analytic_input_grad(net2), 2.5 * analytic_input_grad(net1))
    assert net2.blob_loss_weights == {"loss": 2.5}


def test_loss_weight_on_a_non_loss_layer():
    net = build(HEAD + ip("fc", "x", "h", extra="loss_weight: 1"))
    feed(net)
    assert net.forward_loss() == pytest.approx(net.blobs["h"].data.sum())
    np.testing.assert_allclose(analytic_input_grad(net), numeric_input_grad(net), rtol=1e-6, atol=1e-8)


def test_shared_params_by_name():
    shared = 'param { name: "w" } param { name: "b" }'
    text = HEAD + ip("fc1", "x", "a", extra=shared) + ip("fc2", "x", "b", extra=shared) \
        + euclid("l1", "a", "t") + euclid("l2", "b", "t")
    net = build(text)
    assert net.params["fc1"][0] is net.params["fc2"][0]
    assert len(net.learnable_params) == 2
    feed(net)
    net.forward_loss()
    net.clear_param_diffs()
    net.backward_all()
    w = net.params["fc1"][0]
    grad = w.diff.copy()
    eps, numeric = 1e-6, np.zeros_like(grad)
    for idx in np.ndindex(grad.shape):
        old = w.data[idx]
        w.data[idx] = old + eps
        plus = net.forward_loss()
        w.data[idx] = old - eps
        minus = net.forward_loss()
        w.data[idx] = old
        numeric[idx] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_shared_param_shape_mismatch():
    text = HEAD + ip("fc1", "x", "a", extra='param { name: "w" }') + ip("fc2", "a", "b", n=3, extra='param { name: "w" }')
    with pytest.raises(VggcaffeError, match="shares param 'w'"):
        build(text)


def test_backward_pruned_where_not_needed():
    text = HEAD.replace("force_backward: true", "") + ip("fc1", "x", "a", extra="param { lr_mult: 0 } param { lr_mult: 0 }") \
        + ip("fc2", "a", "b") + euclid("loss", "b", "t") + ip("side", "a", "c")
    net = build(text)
    need = dict(zip(net._layer_names, net._need_backward))
    assert need["fc1"] is False and need["fc2"] is True and need["side"] is False
    assert net.outputs == ["c", "loss"]                     # sorted by name, as Caffe's


def test_propagate_down_false_stops_gradient():
    text = HEAD + ip("fc1", "x", "a") + ip("fc2", "a", "b", extra="propagate_down: false") + euclid("loss", "b", "t")
    net = build(text)
    feed(net)
    net.blobs["x"].diff[...] = 7
    net.forward_loss()
    net.backward_all()
    assert np.all(net.params["fc1"][0].diff == 0)
    assert np.any(net.params["fc2"][0].diff != 0)


def test_forward_backward_api_like_pycaffe():
    text = HEAD.replace('top: "t" ', "").replace(" shape { dim: 3 dim: 2 }", "") + ip("fc", "x", "y")
    net = build(text, "TEST")
    x = np.arange(12.0).reshape(3, 4)
    out = net.forward(x=x)
    w, b = net.params["fc"][0].data, net.params["fc"][1].data
    np.testing.assert_allclose(out["y"], x @ w.T + b)
    diffs = net.backward(y=np.ones((3, 2)))
    np.testing.assert_allclose(diffs["x"], np.ones((3, 2)) @ w)
    out = net.forward(x=np.ones((5, 4)))
    assert out["y"].shape == (5, 2)


def test_unknown_type_lists_known_types():
    with pytest.raises(VggcaffeError, match=r"unknown type 'Convolutoin'; known types: .*Convolution"):
        build(HEAD + 'layer { name: "c" type: "Convolutoin" bottom: "x" top: "c" }')


def test_dangling_bottom_names_layer_and_blob():
    with pytest.raises(VggcaffeError, match="layer 'fc' takes bottom 'nope', which no earlier layer produces"):
        build(HEAD + ip("fc", "nope", "y"))


def test_top_produced_twice():
    with pytest.raises(VggcaffeError, match="produced by multiple sources"):
        build(HEAD + ip("fc1", "x", "y") + ip("fc2", "x", "y"))


def test_error_names_file_and_line(tmp_path):
    path = tmp_path / "n.prototxt"
    path.write_text(HEAD + "\n\n" + ip("fc", "nope", "y"))
    with pytest.raises(VggcaffeError, match=rf"{path}:6: layer 'fc'"):
        Net(str(path))


def test_forward_end_returns_that_layers_tops_past_hidden_splits():
    # "x" feeds two layers, so a Split is inserted before "a": layer indices shift
    net = build(HEAD + ip("a", "x", "a") + ip("b", "x", "b") + euclid("loss", "a", "t") + euclid("loss_b", "b", "t"))
    rs = np.random.default_rng(0)
    out = net.forward(end="a", x=rs.standard_normal((3, 4)), t=rs.standard_normal((3, 2)))
    assert list(out) == ["a"]
    assert list(net.forward(end="loss_b")) == ["loss_b"]


def test_an_in_place_last_layer_leaves_its_blob_an_output():
    # a deploy net cut after relu7 / drop7 (feature extraction): Caffe's outputs are the
    # blobs still available after the last layer, so fc7 stays one
    text = HEAD + ip("fc7", "x", "fc7") + 'layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }\n'
    net = build(text, phase="TEST")
    assert net.outputs == ["fc7", "t"]
    out = net.forward(x=np.ones((3, 4)))
    assert (out["fc7"] >= 0).all() and set(out) == {"fc7", "t"}


def test_pycaffe_constructor_forms(tmp_path):
    text = HEAD + ip("a", "x", "a")
    build(text).save(tmp_path / "w.npz")
    param = parse_text(text, caffe_pb2.NetParameter())
    for args, kwargs in [(("TEST",), {"weights": tmp_path / "w.npz"}), ((str(tmp_path / "w.npz"), "TEST"), {}),
                         ((str(tmp_path / "w.npz"), caffe_pb2.TEST), {})]:
        net = Net(param, *args, **kwargs)
        assert net.phase == "TEST"
        np.testing.assert_array_equal(net.params["a"][0].data, build(text).params["a"][0].data.astype(np.float32))
    with pytest.raises(VggcaffeError, match="phase must be TRAIN or TEST, got 7"):
        Net(param, 7)


def test_two_layers_with_parameters_under_one_name_are_an_error(tmp_path):
    path = tmp_path / "dup.prototxt"
    path.write_text(HEAD + ip("fc", "x", "a") + ip("fc", "a", "b"))
    with pytest.raises(VggcaffeError, match=r"dup.prototxt:\d+: two layers with parameters are named 'fc'"):
        Net(str(path), phase="TRAIN")


def test_input_of_the_wrong_rank_names_the_blob_and_shapes():
    net = build(HEAD + ip("a", "x", "a"), phase="TEST")
    with pytest.raises(VggcaffeError, match=r"input 'x' has shape \(4,\), but the net's 'x' is 2-D \(3, 4\)"):
        net.forward(x=np.zeros(4))
    with pytest.raises(VggcaffeError, match="a prototxt path or a NetParameter, not int"):
        Net(123)


def test_errors_of_a_net_built_from_a_parsed_file_name_the_file(tmp_path):
    path = tmp_path / "n.prototxt"
    path.write_text(HEAD + euclid("loss", "x", "x", 'loss_weight: 1 loss_weight: 2'))
    with pytest.raises(VggcaffeError, match=r"n.prototxt:4: layer 'loss' gives 2 loss_weight values for 1 tops"):
        Net(parse_text(path.read_text(), caffe_pb2.NetParameter()), source=path)


def test_a_refused_propagate_down_names_the_blob_not_its_hidden_split():
    text = ('layer { name: "in" type: "Input" top: "x" top: "label" '
            'input_param { shape { dim: 3 dim: 4 } shape { dim: 3 } } }\n' + ip("fc", "x", "p")
            + 'layer { name: "acc" type: "Accuracy" bottom: "p" bottom: "label" top: "acc" }\n'
            + 'layer { name: "sm" type: "SoftmaxWithLoss" bottom: "p" bottom: "label" top: "sm" '
              'propagate_down: true propagate_down: true }\n')
    with pytest.raises(VggcaffeError, match=r"layer 'sm' cannot backpropagate to its bottom 'label' \(propagate_down\)"):
        build(text)


def test_a_negative_input_dimension_is_an_error():
    with pytest.raises(VggcaffeError, match=r"\(Input\): shape \(-1, 4\) of top 'x' has a negative dimension"):
        build('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: -1 dim: 4 } } }')


def test_pycaffe_names_forward_all_and_get_solver(tmp_path):
    import vggcaffe
    net = build(HEAD + ip("a", "x", "a") + ip("b", "x", "b"), phase="TEST")
    assert net.top_names["a"] == ["a"] and net.bottom_names["a"] == ["x"]        # blobs' names, as net.blobs
    assert "x_x_0_split" not in net.top_names and all(t in net.blobs for ts in net.top_names.values() for t in ts)
    assert list(net.forward(end="x_x_0_split", x=np.zeros((3, 4)), t=np.zeros((3, 2)))) == ["x"]
    x = np.random.default_rng(0).standard_normal((7, 4))                  # 7 samples, batches of 3
    out = net.forward_all(x=x, t=np.zeros((7, 2)))
    assert out["a"].shape == (7, 2) and net.blobs["x"].shape == (3, 4)  # the last batch padded, as pycaffe
    for i in range(7):
        np.testing.assert_allclose(out["a"][i], net.forward(x=x[i:i + 1], t=np.zeros((1, 2)))["a"][0])
    (tmp_path / "s.prototxt").write_text(f'net_param {{ {HEAD} {ip("a", "x", "a")} {euclid("l", "a", "t")} }} '
                                         'base_lr: 0.1 lr_policy: "fixed" max_iter: 1 snapshot_after_train: false')
    assert isinstance(vggcaffe.get_solver(str(tmp_path / "s.prototxt")), vggcaffe.SGDSolver)
