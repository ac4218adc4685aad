"""Prototxt reading: Caffe's upgrades and one-line errors naming file:line:col and layer."""
import pytest

from vggcaffe.errors import VggcaffeError
from vggcaffe.prototxt import parse_text, read_net, read_solver, to_text
from vggcaffe.proto import caffe_pb2

V1 = """
name: "old"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "fc" type: INNER_PRODUCT bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
"""


def write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_v1_layers_and_input_dim_upgrade(tmp_path):
    net = read_net(write(tmp_path, V1))
    assert not net.layers and not net.input and not net.input_dim
    assert [l.type for l in net.layer] == ["Input", "Convolution", "ReLU", "InnerProduct"]
    assert list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3, 8, 8]
    conv = net.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.convolution_param.num_output == 4


def test_input_shape_upgrade(tmp_path):
    text = 'input: "a" input_shape { dim: 1 dim: 2 } input: "b" input_shape { dim: 3 }'
    net = read_net(write(tmp_path, text))
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    assert list(net.layer[0].top) == ["a", "b"]


def test_legacy_transform_fields_move(tmp_path):
    text = 'layer { name: "d" type: "ImageData" top: "data" top: "label" ' \
           'image_data_param { source: "x.txt" crop_size: 4 mirror: true scale: 0.5 } }'
    layer = read_net(write(tmp_path, text)).layer[0]
    assert layer.transform_param.crop_size == 4 and layer.transform_param.mirror
    assert layer.transform_param.scale == 0.5 and not layer.image_data_param.HasField("crop_size")


def test_unknown_field_names_file_line_layer_and_suggests(tmp_path):
    text = 'layer {\n  name: "c1"\n  type: "Convolution"\n  convolution_param {\n    num_ouput: 3\n  }\n}\n'
    path = write(tmp_path, text)
    with pytest.raises(VggcaffeError) as e:
        read_net(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:5:5:")
    assert "'num_ouput'" in msg and "layer 'c1'" in msg and "did you mean 'num_output'" in msg
    assert "\n" not in msg


def test_syntax_error_has_position(tmp_path):
    path = write(tmp_path, 'name: "x"\nlayer { name: "a" type: "ReLU" \n')
    with pytest.raises(VggcaffeError, match=r"net.prototxt:\d+:\d+"):
        read_net(path)


def test_missing_file():
    with pytest.raises(VggcaffeError, match="no such file"):
        read_net("/nonexistent/net.prototxt")


def test_solver_type_enum_upgrade(tmp_path):
    solver = read_solver(write(tmp_path, 'base_lr: 0.1 solver_type: SGD lr_policy: "fixed"'))
    assert solver.type == "SGD" and not solver.HasField("solver_type")


def test_round_trip_text(tmp_path):
    net = read_net(write(tmp_path, V1))
    again = parse_text(to_text(net), caffe_pb2.NetParameter())
    assert again == net


def test_layer_registry_v1_names_agree_with_the_upgrade_table():
    from vggcaffe.layers import LAYER_TYPES, V1_TYPE_NAMES
    from vggcaffe.prototxt import V1_TYPES
    assert V1_TYPE_NAMES and all(V1_TYPES[v1] == v2 for v1, v2 in V1_TYPE_NAMES.items())
    assert all(v2 in LAYER_TYPES for v2 in V1_TYPE_NAMES.values())


RESNET_SNIPPET = """
name: "resnet_snippet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { use_global_stats: true moving_average_fraction: 0.9 eps: 1e-5 } }
layer { name: "scale_conv1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv1" top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -1 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "conv1" top: "cat" concat_param { axis: 1 } }
layer { name: "noise" type: "DummyData" top: "noise" dummy_data_param { shape { dim: 1 } data_filler { type: "gaussian" } } }
"""


def test_caffes_other_layer_parameters_parse_and_stop_at_the_layer_type(tmp_path):
    # Caffe's schema in full: a ResNet prototxt reads; building it names the unknown type
    from vggcaffe.net import Net
    path = tmp_path / "resnet.prototxt"
    path.write_text(RESNET_SNIPPET)
    net = read_net(path)
    bn = next(lp for lp in net.layer if lp.type == "BatchNorm")
    assert bn.batch_norm_param.use_global_stats and bn.batch_norm_param.eps == pytest.approx(1e-5)
    assert list(net.layer[4].eltwise_param.coeff) == [1, -1] and net.layer[5].concat_param.axis == 1
    with pytest.raises(VggcaffeError, match=r"resnet.prototxt:6: layer 'bn_conv1' has unknown type 'BatchNorm'; "
                                            r"known types: .*Convolution"):
        Net(str(path))


def test_upgrade_net_proto_text_writes_the_current_format(tmp_path):
    from vggcaffe.cli import main
    (tmp_path / "old.prototxt").write_text('name: "old" input: "data" input_dim: 1 input_dim: 3 input_dim: 4 '
                                           'input_dim: 4 layers { name: "r" type: RELU bottom: "data" top: "data" }')
    assert main(["upgrade_net_proto_text", str(tmp_path / "old.prototxt"), str(tmp_path / "new.prototxt")]) == 0
    new = parse_text((tmp_path / "new.prototxt").read_text(), caffe_pb2.NetParameter())
    assert not new.layers and not new.input and [(lp.name, lp.type) for lp in new.layer] == [
        ("input", "Input"), ("r", "ReLU")]
    assert list(new.layer[0].input_param.shape[0].dim) == [1, 3, 4, 4]


def test_v1_layers_keep_the_parameters_of_every_caffe_layer(tmp_path):
    path = tmp_path / "v1.prototxt"
    path.write_text('layers { name: "cat" type: CONCAT bottom: "a" bottom: "b" top: "c" concat_param { axis: 2 } }\n'
                    'layers { name: "pw" type: POWER bottom: "c" top: "d" power_param { power: 2 shift: 1 } }\n')
    net = read_net(path)
    assert [lp.type for lp in net.layer] == ["Concat", "Power"]
    assert net.layer[0].concat_param.axis == 2 and net.layer[1].power_param.shift == 1
