"""Weight files: .npz and .caffemodel round trips, V1 caffemodels with legacy shapes, clear mismatch errors."""
import os
import stat

import numpy as np
import pytest

from vggcaffe.errors import VggcaffeError
from vggcaffe.net import Net
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text

TEXT = """
name: "tiny"
input: "data" input_dim: 2 input_dim: 3 input_dim: 6 input_dim: 6
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def tiny(seed=1, text=TEXT):
    return Net(parse_text(text, caffe_pb2.NetParameter()), seed=seed)


@pytest.mark.parametrize("ext", [".npz", ".caffemodel"])
def test_save_and_load_give_identical_outputs(tmp_path, ext):
    net = tiny(1)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    expected = net.forward(data=x)["prob"].copy()
    net.save(tmp_path / f"w{ext}")
    other = tiny(2)
    assert not np.array_equal(other.forward(data=x)["prob"], expected)
    other.copy_from(tmp_path / f"w{ext}")
    np.testing.assert_array_equal(other.forward(data=x)["prob"], expected)


def test_npz_keys_are_layer_slash_index(tmp_path):
    tiny().save(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["conv1/0", "conv1/1", "fc/0", "fc/1"]


def test_v1_caffemodel_with_legacy_4d_shapes(tmp_path):
    net = tiny(1)
    model = caffe_pb2.NetParameter(name="tiny")
    for name, v1type in (("conv1", caffe_pb2.V1LayerParameter.CONVOLUTION),
                         ("fc", caffe_pb2.V1LayerParameter.INNER_PRODUCT)):
        layer = model.layers.add(name=name, type=v1type)
        for blob in net.params[name]:
            shape = (1,) * (4 - blob.data.ndim) + blob.shape
            proto = layer.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3])
            proto.data.extend(blob.data.ravel().tolist())
    model.layers.add(name="not_in_net", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT).blobs.add(num=1)
    (tmp_path / "v1.caffemodel").write_bytes(model.SerializeToString())
    other = tiny(2)
    other.copy_from(tmp_path / "v1.caffemodel")
    for name in ("conv1", "fc"):
        for a, b in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    from vggcaffe.cli import main                                   # Caffe's upgrade_net_proto_binary
    assert main(["upgrade_net_proto_binary", str(tmp_path / "v1.caffemodel"), str(tmp_path / "v2.caffemodel")]) == 0
    upgraded = caffe_pb2.NetParameter()
    upgraded.ParseFromString((tmp_path / "v2.caffemodel").read_bytes())
    assert not upgraded.layers and [(lp.name, lp.type) for lp in upgraded.layer] == [
        ("conv1", "Convolution"), ("fc", "InnerProduct"), ("not_in_net", "InnerProduct")]
    third = tiny(3)
    third.copy_from(tmp_path / "v2.caffemodel")
    np.testing.assert_array_equal(third.params["fc"][0].data, net.params["fc"][0].data)


def test_shape_mismatch_names_layer_and_both_shapes(tmp_path):
    tiny().save(tmp_path / "w.npz")
    bigger = tiny(text=TEXT.replace("num_output: 5", "num_output: 7"))
    with pytest.raises(VggcaffeError, match=r"layer 'fc': shape mismatch, file has \(5, 36\), net has \(7, 36\)"):
        bigger.copy_from(tmp_path / "w.npz")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(VggcaffeError, match="no such weights file"):
        tiny().copy_from(tmp_path / "nope.npz")
    (tmp_path / "bad.caffemodel").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(VggcaffeError, match="bad.caffemodel"):
        tiny().copy_from(tmp_path / "bad.caffemodel")


def test_npz_is_loaded_without_pickle(tmp_path):
    np.savez(tmp_path / "obj.npz", **{"fc/0": np.array([object()], dtype=object)})
    with pytest.raises(VggcaffeError, match="obj.npz"):
        tiny().copy_from(tmp_path / "obj.npz")


def reference_blob(array):
    """A BlobProto made through protobuf's API (what the writers must match byte for byte)."""
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend(array.shape)
    values = array.ravel().tolist()
    (proto.double_data if array.dtype == np.float64 else proto.data).extend(values)
    return proto


@pytest.mark.parametrize("array", [np.arange(-3, 9, dtype=np.float32).reshape(3, 4) / 7,
                                   np.array([np.nan, -0.0, np.inf, 1e-45, 3.4e38], np.float32),
                                   np.linspace(-1, 1, 300).reshape(10, 30),            # float64: double_data
                                   np.zeros((0, 4), np.float32), np.float32(2.5)])
def test_blob_pieces_are_protobufs_own_bytes(array):
    from vggcaffe.weights import blob_proto_pieces, message_field
    assert b"".join(blob_proto_pieces(array)) == reference_blob(array).SerializeToString()
    wrapped = caffe_pb2.LayerParameter(name="l")
    wrapped.blobs.add().CopyFrom(reference_blob(array))
    assert (caffe_pb2.LayerParameter(name="l").SerializeToString() + b"".join(message_field(7, blob_proto_pieces(array)))
            == wrapped.SerializeToString())


def test_caffemodel_file_is_protobufs_own_bytes(tmp_path):
    net = tiny(3)
    net.save(tmp_path / "w.caffemodel")
    param = caffe_pb2.NetParameter(name=net.name)
    for name, blobs in net.params.items():
        layer = param.layer.add(name=name, type=net.layer_dict[name].type)
        for blob in blobs:
            layer.blobs.add().CopyFrom(reference_blob(blob.data))
    assert (tmp_path / "w.caffemodel").read_bytes() == param.SerializeToString()


def test_any_name_but_npz_saves_a_caffemodel_and_files_are_read_by_content(tmp_path):
    net = tiny(1)
    net.save(tmp_path / "model.bin")                      # pycaffe's net.save writes binaryproto
    param = caffe_pb2.NetParameter()
    param.ParseFromString((tmp_path / "model.bin").read_bytes())
    assert [lp.name for lp in param.layer] == ["conv1", "fc"]
    net.save(tmp_path / "arrays.npz")
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.weights")   # an npz under another name
    for name in ("model.bin", "arrays.weights"):
        other = tiny(2)
        other.copy_from(tmp_path / name)
        np.testing.assert_array_equal(other.params["fc"][0].data, net.params["fc"][0].data)


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tiny().save(tmp_path / "w.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "w.npz").st_mode) == 0o644


@pytest.mark.parametrize("content, message", [
    (b"", "holds no weights"),                                           # empty file
    (b"PK\x03\x04 truncated", "not a readable .npz"),                     # half a zip
    (np.lib.format.MAGIC_PREFIX + b"\x01\x00 npy", "not a binary NetParameter|holds no weights"),
])
def test_unreadable_weight_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "w.npz").write_bytes(content)
    with pytest.raises(VggcaffeError, match=message):
        tiny().copy_from(tmp_path / "w.npz")


def test_weights_of_another_net_are_refused_and_missing_layers_named(tmp_path, capsys):
    np.savez(tmp_path / "other.npz", **{"conv9/0": np.zeros(3)})
    with pytest.raises(VggcaffeError, match=r"none of its layers \(conv9\) is a layer with parameters.*conv1, fc"):
        tiny().copy_from(tmp_path / "other.npz")
    net = tiny(1)
    np.savez(tmp_path / "part.npz", **{"conv1/0": net.params["conv1"][0].data, "conv1/1": net.params["conv1"][1].data})
    tiny(2).copy_from(tmp_path / "part.npz")
    assert "has no weights for layer(s) fc: they keep their initialisation" in capsys.readouterr().err


def test_writing_into_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(VggcaffeError, match="cannot write .*missing/w.npz"):
        tiny().save(tmp_path / "missing" / "w.npz")
