"""GPU fast paths: cuDNN convolution, fused kernels, precision policy, net preparation.

Imported only in GPU mode (it imports CuPy); CPU-only installs never load it.
`prepare_net(net)` folds each in-place ReLU into the convolution before it,
puts the one-pass MAX pooling kernels in place of MAX Pooling layers, and makes
convolution and pooling tops channels-last where all their consumers accept
any strides; `setup_solver(solver)` applies the solver's precision, prepares its
nets, and returns the fused SGD update.
"""
from ..layers.relu import consumers, fold_relu
from . import cudnn_conv, pooling
from .kernels import FusedSGD
from .precision import PRECISIONS, get_precision, set_precision  # noqa: F401

# Layers whose forward and backward accept NHWC-strided (N, C, H, W) bottoms.
LAYOUT_FREE = ("ReLU", "Pooling", "LRN", "Dropout")


def _accepts_any_layout(layer, x):
    if layer.type == "Convolution":
        return cudnn_conv.applies(layer, x)
    return layer.type in LAYOUT_FREE


def prepare_net(net):
    """Put the GPU fast paths in place in `net` (see the module docstring); returns `net`."""
    for i, layer in enumerate(net.layers):
        bottom, top = net._bottoms[i], net._tops[i]
        if pooling.applies(layer, bottom, top):
            layer = net.layers[i] = net.layer_dict[layer.name] = pooling.MaxPoolGPU(layer)
        conv = layer.type == "Convolution" and len(top) == 1 and cudnn_conv.applies(layer, bottom[0].data)
        if not (conv or isinstance(layer, pooling.MaxPoolGPU)):
            continue
        users = consumers(net, i)
        layer.channels_last = bool(users) and all(
            _accepts_any_layout(net.layers[j], top[0].data) for j in users)
        if conv:
            fold_relu(net, i, users)
        layer.reshape(bottom, top)
    return net


def setup_solver(solver):
    """Set the solver's precision, prepare its nets; the fused SGD update to use."""
    set_precision(solver.param.precision)
    for net in [solver.net] + list(solver.test_nets):
        prepare_net(net)
    return FusedSGD()
