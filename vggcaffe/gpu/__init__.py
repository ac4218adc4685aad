"""GPU fast paths: cuDNN convolution, fused kernels, precision policy, net preparation.

Imported only in GPU mode (it imports CuPy); CPU-only installs never load it.
`prepare_net(net)`
  - puts the one-pass MAX pooling kernels in place of MAX Pooling layers;
  - folds each in-place ReLU into the convolution before it, and lets the MAX
    pool after such a convolution do the ReLU's backward on its smaller top;
  - makes convolution and pooling tops channels-last where all their consumers
    accept any strides (unless convolutions run NCHW: strict fp32 with
    `set_fp32_layout("nchw")`);
  - in bf16, stores as bfloat16 the tops whose producer and consumers are all
    convolutions and MAX pools (the activations between them: half the bytes
    and no casts);
  - gives activation diffs whose backward lifetimes do not overlap the same
    memory (`vggcaffe.memory.share_diffs`; a diff then holds its gradient only
    from the backward of its last consumer to that of its producer, as in
    PyTorch, where intermediate gradients are freed).
`setup_solver(solver)` applies the solver's precision, prepares its nets, and
returns the fused SGD update.
"""
import cupy

from ..layers.relu import FusedReLU, consumers, fold_relu
from ..memory import share_diffs
from . import cudnn_conv, pooling
from .kernels import BF16, FusedSGD
from .precision import PRECISIONS, conv_layout, get_precision, set_fp32_layout, set_precision  # noqa: F401

# Layers whose forward and backward accept NHWC-strided (N, C, H, W) bottoms.
LAYOUT_FREE = ("ReLU", "Pooling", "LRN", "Dropout")


def _accepts_any_layout(layer, x):
    if layer.type == "Convolution":
        return cudnn_conv.applies(layer, x)
    return layer.type in LAYOUT_FREE


def _reads_bf16(net, j):
    """Layer j takes a bfloat16 channels-last bottom (a cuDNN convolution or a MAX pool kernel)."""
    layer = net.layers[j]
    if layer.type == "Convolution":
        return cudnn_conv.applies(layer, net._bottoms[j][0].template)
    return isinstance(layer, pooling.MaxPoolGPU)


def _relu_grad_to_pool(net, i, users):
    """When a folded ReLU's output feeds only a MAX pool kernel, that pool masks its dY."""
    pool = net.layers[users[-1]] if net.layers[i].fused_relu and len(users) == 2 else None
    if isinstance(pool, pooling.MaxPoolGPU):
        net.layers[i].relu_grad_in_pool = pool.relu_mask = True


def prepare_net(net, share=True):
    """Put the GPU fast paths in place in `net` (see the module docstring); returns `net`.
    `share=False` keeps a diff array per blob."""
    for i, layer in enumerate(net.layers):
        if pooling.applies(layer, net._bottoms[i], net._tops[i]):
            net.layers[i] = net.layer_dict[layer.name] = pooling.MaxPoolGPU(layer)
    bf16 = []
    for i, layer in enumerate(net.layers):
        bottom, top = net._bottoms[i], net._tops[i]
        conv = layer.type == "Convolution" and len(top) == 1 and cudnn_conv.applies(layer, bottom[0].template)
        if not (conv or isinstance(layer, pooling.MaxPoolGPU)):
            continue
        users = consumers(net, i)
        layer.channels_last = conv_layout() == "nhwc" and bool(users) and all(
            _accepts_any_layout(net.layers[j], top[0].template) for j in users)
        if conv:
            fold_relu(net, i, users)
            _relu_grad_to_pool(net, i, users)
        readers = [j for j in users if not isinstance(net.layers[j], FusedReLU)]
        if get_precision() == "bf16" and layer.channels_last and readers and all(
                _reads_bf16(net, j) for j in readers):
            bf16.append(i)
    for i in bf16:
        net.layers[i].top_dtype = BF16
    for i, layer in enumerate(net.layers):
        if getattr(layer, "channels_last", False):
            layer.reshape(net._bottoms[i], net._tops[i])
    if share:
        share_diffs(net)
        cupy.get_default_memory_pool().free_all_blocks()   # the replaced diffs go back to the device
    return net


def setup_solver(solver):
    """Set the solver's precision, prepare its nets; the fused SGD update to use."""
    set_precision(solver.param.precision)
    for net in [solver.net] + list(solver.test_nets):
        prepare_net(net)
    return FusedSGD()
