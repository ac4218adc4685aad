"""Input (net inputs fed from outside) and Split (one blob feeding several layers).

Split is never written in a prototxt: the net inserts it where a blob has more
than one consumer, so each consumer gets its own diff and backward sums them.
"""
from ..errors import VggcaffeError
from .base import Layer, register


@register("Input")
class InputLayer(Layer):
    exact_num_bottom = 0
    min_top = 1

    def layer_setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (1, len(top)):
            raise VggcaffeError(f"layer '{self.name}' (Input) gives {len(shapes)} shapes for {len(top)} tops; "
                                f"give 1 or {len(top)}")
        for i, blob in enumerate(top):
            dims = tuple(shapes[0 if len(shapes) == 1 else i].dim)
            if any(d < 0 for d in dims):
                raise VggcaffeError(f"layer '{self.name}' (Input): shape {dims} of top '{self.param.top[i]}' "
                                    f"has a negative dimension")
            blob.reshape(dims)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass


@register("Split", "SPLIT")
class SplitLayer(Layer):
    exact_num_bottom = 1
    min_top = 1

    def reshape(self, bottom, top):
        # Every top shares the bottom's data (once it exists: forward makes sure); each
        # keeps its own diff.
        for blob in top:
            if blob.shape != bottom[0].shape:
                blob.reshape(bottom[0].shape)
            if bottom[0].has_data:
                blob.data = bottom[0].data

    def forward(self, bottom, top):
        for blob in top:
            blob.data = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        diff[...] = top[0].diff
        for blob in top[1:]:
            diff += blob.diff

