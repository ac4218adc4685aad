"""The Python layer: a class named by python_param, called as Caffe calls it."""
import numpy as np
import pytest

from vggcaffe.errors import VggcaffeError
from vggcaffe.net import Net
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text

MODULE = '''
import json
import numpy as np
import vggcaffe

class Twice:
    def setup(self, bottom, top):
        self.factor = json.loads(self.param_str)["factor"]
        self.seen = (self.phase, self.layer_param.name, self.name)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.factor * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.factor * top[0].diff

class Noise(vggcaffe.Layer):          # pycaffe's caffe.Layer: setup and backward inherited
    def reshape(self, bottom, top):
        top[0].reshape(3)

    def forward(self, bottom, top):
        top[0].data[...] = self.rng.standard_normal(3)
'''

NET = '''name: "py" force_backward: true
layer { name: "data" type: "Input" top: "x" top: "target" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "twice" type: "Python" bottom: "x" top: "y"
  python_param { module: "%s" layer: "%s" param_str: '{"factor": 3}' } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "target" top: "loss" }
'''


def net_param(text):
    return parse_text(text, caffe_pb2.NetParameter())


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "my_py_layers.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_py_layers"


def test_forward_and_backward_go_through_the_class(module):
    net = Net(net_param(NET % (module, "Twice")), phase="TRAIN", dtype=np.float64)
    x, target = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    net.blobs["x"].data[...], net.blobs["target"].data[...] = x, target
    loss = net.forward_backward()
    assert loss == pytest.approx(((3 * x - target) ** 2).sum() / 4)
    np.testing.assert_allclose(net.blobs["x"].diff, 3 * (3 * x - target) / 2)
    impl = net.layer_dict["twice"].impl
    assert impl.seen == ("TRAIN", "twice", "twice")


def test_rng_is_the_nets_seeded_generator(module):
    text = 'name: "n" layer { name: "noise" type: "Python" top: "z" python_param { module: "%s" layer: "Noise" } }'
    draws = [Net(net_param(text % module), seed=5).forward()["z"].copy() for _ in range(2)]
    np.testing.assert_array_equal(*draws)
    assert not np.array_equal(draws[0], Net(net_param(text % module), seed=6).forward()["z"])


@pytest.mark.parametrize("module_name, cls, message", [
    ("no_such_module_xyz", "Twice", "cannot import module 'no_such_module_xyz'"),
    (None, "Nope", "module 'my_py_layers' has no class 'Nope'"),
    ("", "", "python_param needs module and layer")])
def test_errors_name_the_layer(module, module_name, cls, message):
    text = NET % (module if module_name is None else module_name, cls)
    with pytest.raises(VggcaffeError, match=f"'twice' \\(Python\\): {message}"):
        Net(net_param(text), phase="TRAIN")
