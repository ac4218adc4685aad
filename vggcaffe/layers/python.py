"""Python: a layer written in Python, named by module and class (Caffe's `type: "Python"`).

    layer { name: "data" type: "Python" top: "data" top: "label"
            python_param { module: "mypkg.layers" layer: "MyData" param_str: "{...}" } }

As pycaffe's: the class is imported from `module` (which must be importable:
on sys.path, or a package), instantiated without arguments, given
`param_str` and `phase` ("TRAIN" or "TEST"), then called as Caffe calls it:
setup(bottom, top), reshape(bottom, top), forward(bottom, top),
backward(top, propagate_down, bottom), with the net's Blobs (`.data`,
`.diff`, `.reshape(*shape)`, `.shape`, `.count`). On the GPU a blob's arrays
are CuPy arrays: write host arrays through `vggcaffe.backend.array_module(b.data).asarray`.
vggcaffe also sets `layer_param` (the whole LayerParameter: a data layer can
read its transform_param) and `rng` (a NumPy Generator seeded by the net, so
solver runs with a random_seed repeat). Python layers have no learnable
parameters here (Caffe's `self.blobs` is not supported). A class may derive
from `vggcaffe.Layer` (PythonLayerBase), as pycaffe code derives from caffe.Layer.
"""
import importlib

from .base import Layer, register


class PythonLayerBase:
    """The base of a Python layer's class (pycaffe's caffe.Layer): the net sets param_str,
    phase, layer_param, rng and name, then calls setup, reshape, forward and backward."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        raise NotImplementedError(f"Python layer {type(self).__name__} has no forward")

    def backward(self, top, propagate_down, bottom):
        pass


@register("Python")
class PythonLayer(Layer):

    def layer_setup(self, bottom, top):
        p = self.param.python_param
        if not p.module or not p.layer:
            raise self.error("python_param needs module and layer")
        try:
            module = importlib.import_module(p.module)
        except ImportError as e:
            raise self.error(f"cannot import module '{p.module}' ({e})") from None
        cls = getattr(module, p.layer, None)
        if cls is None:
            raise self.error(f"module '{p.module}' has no class '{p.layer}'")
        self.impl = cls()
        self.impl.param_str, self.impl.phase = p.param_str, self.phase
        self.impl.layer_param, self.impl.rng, self.impl.name = self.param, self.rng, self.name
        self.impl.setup(bottom, top)

    def reshape(self, bottom, top):
        self.impl.reshape(bottom, top)

    def forward(self, bottom, top):
        self.impl.forward(bottom, top)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.impl.backward(top, propagate_down, bottom)
