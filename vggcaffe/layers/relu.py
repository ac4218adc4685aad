"""ReLU: y = max(x, 0) + negative_slope * min(x, 0), usable in place.

In place (top is bottom) the bottom's data already holds y when backward runs.
Backward tests `bottom.data > 0` exactly as Caffe does, so it reads y then;
for negative_slope >= 0, y > 0 exactly where x > 0, so the gradient is the
same either way (for a negative slope, in place, it is Caffe's too).

FusedReLU stands in for an in-place ReLU whose work the convolution before it
does (`fused_relu`: forward writes max(conv + b, 0), backward masks dY by Y > 0).
"""
from ..backend import array_module
from .base import Layer, register


@register("ReLU", "RELU")
class ReLULayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.negative_slope = self.param.relu_param.negative_slope

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data                                   # (N, ...) any shape
        xp = array_module(x)
        if self.negative_slope == 0:
            xp.maximum(x, 0, out=top[0].data)
        else:
            top[0].data[...] = xp.where(x > 0, x, x * x.dtype.type(self.negative_slope))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        positive = bottom[0].data > 0                        # = (y > 0) in place, see above
        dy = top[0].diff
        xp = array_module(dy)
        if self.negative_slope == 0:
            xp.multiply(dy, positive, out=bottom[0].diff)
        else:
            bottom[0].diff[...] = dy * xp.where(positive, 1, dy.dtype.type(self.negative_slope))


class FusedReLU(Layer):
    """An in-place ReLU folded into the convolution before it: its work runs there."""
    type = "ReLU"

    def __init__(self, relu):
        super().__init__(relu.param, phase=relu.phase, dtype=relu.dtype, rng=relu.rng)
        self.negative_slope = relu.negative_slope

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass


def consumers(net, i):
    """Indices of the layers after layer i of `net` that read its first top."""
    top = net._tops[i][0]
    return [j for j in range(i + 1, len(net.layers)) if any(b is top for b in net._bottoms[j])]


def fold_relu(net, i, users):
    """Fold into layer i the in-place ReLU (slope 0) that is the first of its top's
    `users`, if there is one: sets the layer's fused_relu and puts a FusedReLU in
    the ReLU's place."""
    relu = net.layers[users[0]] if users else None
    if (relu is not None and relu.type == "ReLU" and not isinstance(relu, FusedReLU)
            and net._tops[users[0]][0] is net._tops[i][0] and relu.negative_slope == 0):
        net.layers[i].fused_relu = True
        net.layers[users[0]] = net.layer_dict[relu.name] = FusedReLU(relu)
