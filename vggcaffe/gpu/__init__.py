"""GPU fast paths: cuDNN convolution, fused kernels, precision policy, net preparation.

Imported only in GPU mode (it imports CuPy); CPU-only installs never load it.
`prepare_net(net)`
  - puts the one-pass MAX pooling kernels in place of MAX Pooling layers;
  - folds each in-place ReLU into the convolution before it, and lets the MAX
    pool after such a convolution do the ReLU's backward on its smaller top;
  - makes convolution and pooling tops channels-last where all their consumers
    accept any strides;
  - in bf16, stores as bfloat16 the tops whose producer and consumers are all
    convolutions and MAX pools (the activations between them: half the bytes
    and no casts);
  - gives activation diffs whose backward lifetimes do not overlap the same
    memory (`share_diffs`; a diff then holds its gradient only from the
    backward of its last consumer to that of its producer, as in PyTorch,
    where intermediate gradients are freed).
`setup_solver(solver)` applies the solver's precision, prepares its nets, and
returns the fused SGD update.
"""
import cupy
import numpy as np

from ..layers.relu import FusedReLU, consumers, fold_relu
from . import cudnn_conv, pooling
from .kernels import BF16, FusedSGD
from .precision import PRECISIONS, get_precision, set_precision  # noqa: F401

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
        return cudnn_conv.applies(layer, net._bottoms[j][0].data)
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
        conv = layer.type == "Convolution" and len(top) == 1 and cudnn_conv.applies(layer, bottom[0].data)
        if not (conv or isinstance(layer, pooling.MaxPoolGPU)):
            continue
        users = consumers(net, i)
        layer.channels_last = bool(users) and all(
            _accepts_any_layout(net.layers[j], top[0].data) for j in users)
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
    return net


def share_diffs(net):
    """Let activation blobs whose diffs are live at disjoint times in backward share memory.

    A blob's diff is live from the backward of its last consumer down to that of
    its first producer (in-place layers keep one blob). Blobs with a loss weight,
    net inputs and outputs, and blobs whose diff is already an alias of another's
    keep their own arrays; so do blobs whose producer runs no backward, and all
    of a TEST net's (its diffs are then allocated only if a backward is ever run
    on it, which the solver never does). Slots are assigned greedily in producer
    order; each holds the largest of its blobs, and every blob gets a view of
    the same layout (NCHW or channels-last) and dtype as its data."""
    net.shared_diff_bytes = 0
    if net.phase == "TEST":
        return net
    span, order = {}, []
    for i, (bottom, top) in enumerate(zip(net._bottoms, net._tops)):
        for b in bottom:
            if id(b) in span:
                span[id(b)][2] = i
        for t in top:
            if id(t) not in span and net._need_backward[i]:
                span[id(t)] = [t, i, i]
                order.append(id(t))
    keep = {id(net.blobs[name]) for name in list(net.inputs) + list(net.outputs) if name in net.blobs}
    keep |= {id(net._tops[i][t]) for i, t in net.loss_weights}
    starts = {}
    for blob, _, _ in span.values():
        if blob.has_diff:
            starts.setdefault(blob.diff.data.ptr, []).append(id(blob))
    keep |= {b for ids in starts.values() if len(ids) > 1 for b in ids}
    slots = []                                            # [last layer index, bytes, [blobs]]
    for key in order:
        blob, first, last = span[key]
        if key in keep or last == first or blob.data.ndim == 0:
            continue
        slot = next((s for s in slots if s[0] < first), None)
        if slot is None:
            slot = [0, 0, []]
            slots.append(slot)
        slot[0], slot[1] = last, max(slot[1], blob.data.nbytes)
        slot[2].append(blob)
    for _, nbytes, blobs in slots:
        memory = cupy.empty(nbytes, np.uint8)
        for blob in blobs:
            blob.diff = _view(memory, blob.data)
    net.shared_diff_bytes = sum(s[1] for s in slots)
    cupy.get_default_memory_pool().free_all_blocks()
    return net


def _view(memory, like):
    """An array over `memory` with `like`'s shape, dtype and layout (C-contiguous or channels-last)."""
    flat = memory[:like.nbytes].view(like.dtype)
    if like.ndim == 4 and cudnn_conv.is_channels_last(like) and not like.flags.c_contiguous:
        n, c, h, w = like.shape
        return flat.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return flat.reshape(like.shape)


def setup_solver(solver):
    """Set the solver's precision, prepare its nets; the fused SGD update to use."""
    set_precision(solver.param.precision)
    for net in [solver.net] + list(solver.test_nets):
        prepare_net(net)
    return FusedSGD()
