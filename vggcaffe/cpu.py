"""CPU fast paths: net preparation for the NumPy backend.

`prepare_net(net)` folds each in-place ReLU into the convolution before it
(the convolution then writes max(conv + b, 0) and masks dY itself, or the MAX
pool after it masks its smaller dY when it is the only consumer), and keeps
channels-last (NHWC) memory from each convolution that computes in NHWC
through the ReLUs, pools and dropouts after it to the next such convolution,
wherever every consumer of a blob accepts that layout: no NCHW <-> NHWC
transposes then run between them. A prepared net computes what the plain one
does (tests/test_cpu_prepare.py); the Solver and `vggcaffe time` prepare their
nets, and blobs keep their logical (N, C, H, W) shape, so pycaffe-style access
is unchanged.
"""
from .layers.relu import consumers, fold_relu
from .proto import caffe_pb2

# Layers whose forward and backward accept channels-last bottoms on NumPy.
ANY_LAYOUT = ("ReLU", "Pooling", "Dropout")


def _accepts_channels_last(layer):
    if layer.type == "Convolution":
        return layer.nhwc
    return layer.type in ANY_LAYOUT


def _relu_grad_to_pool(net, i, users):
    """When a folded ReLU's output feeds only a MAX pool, let the pool do the ReLU's
    backward on its (4x smaller) top instead of the convolution on its own."""
    conv = net.layers[i]
    pool = net.layers[users[-1]] if conv.fused_relu and len(users) == 2 else None
    if (pool is not None and pool.type == "Pooling" and pool.pool == caffe_pb2.PoolingParameter.MAX
            and len(net._tops[users[-1]]) == 1):
        conv.relu_grad_in_pool = pool.relu_mask = True


def prepare_net(net):
    """Fold ReLUs and lay out blobs in `net` (see the module docstring); returns `net`."""
    for i, layer in enumerate(net.layers):
        bottom, top = net._bottoms[i], net._tops[i]
        conv = layer.type == "Convolution" and len(top) == 1
        pool = layer.type == "Pooling" and len(top) == 1 and bottom[0].channels_last
        if not (conv or pool):
            continue
        users = consumers(net, i)
        if conv:
            fold_relu(net, i, users)
            _relu_grad_to_pool(net, i, users)
        layer.channels_last = ((pool or layer.writes_channels_last) and bool(users)
                               and all(_accepts_channels_last(net.layers[j]) for j in users))
        layer.reshape(bottom, top)
    return net
