"""pycaffe's caffe.io for Python users: Transformer, load_image, resize_image, oversample.

The usual pycaffe preprocessing reads here unchanged:

    t = vggcaffe.io.Transformer({"data": net.blobs["data"].data.shape})
    t.set_transpose("data", (2, 0, 1))      # H x W x C -> C x H x W
    t.set_raw_scale("data", 255)            # load_image gives [0, 1]
    t.set_mean("data", np.array([123.68, 116.78, 103.94]))
    net.blobs["data"].data[...] = t.preprocess("data", vggcaffe.io.load_image("cat.jpg"))

As in pycaffe, preprocess resizes to the input's H x W, then transposes, swaps
channels, scales by raw_scale, subtracts the mean, scales by input_scale;
deprocess undoes it. pycaffe users usually add set_channel_swap("data",
(2, 1, 0)) because Caffe's zoo models take BGR; vggcaffe's own nets take RGB.
Images are read with Pillow (pycaffe uses scikit-image): floats in [0, 1].
"""
import numpy as np

from .data.image_io import load_image as _load_uint8
from .data.image_io import resize
from .errors import VggcaffeError


def load_image(filename, color=True):
    """An image as float32 H x W x 3 RGB in [0, 1] (H x W x 1 when not color)."""
    return _load_uint8(filename, color).astype(np.float32) / 255


def resize_image(im, new_dims, interp_order=1):
    """`im` (H x W x K) resized to new_dims (height, width): bilinear (interp_order 1) or
    nearest (0), each channel in float32."""
    from PIL import Image
    height, width = int(new_dims[0]), int(new_dims[1])
    resample = Image.NEAREST if interp_order == 0 else Image.BILINEAR
    return resize(np.asarray(im, np.float32), height, width, resample)


def oversample(images, crop_dims):
    """pycaffe's 10-view crops: the 4 corners and the centre of each image (H x W x K),
    and their mirrors -> (10 N) x crop_h x crop_w x K."""
    images = [np.asarray(im) for im in images]
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    out = []
    for im in images:
        h, w = im.shape[:2]
        if h < ch or w < cw:
            raise VggcaffeError(f"oversample: image {h}x{w} is smaller than the crop {ch}x{cw}")
        starts = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
        crops = [im[r:r + ch, c:c + cw] for r, c in starts]
        out.extend(crops + [crop[:, ::-1] for crop in crops])
    return np.stack(out)


class Transformer:
    """pycaffe's caffe.io.Transformer: preprocessing of images for the net's inputs,
    given as {input name: its blob shape (N, C, H, W)}."""

    def __init__(self, inputs):
        self.inputs = {name: tuple(shape) for name, shape in inputs.items()}
        self.transpose, self.channel_swap, self.raw_scale, self.mean, self.input_scale = {}, {}, {}, {}, {}

    def _check(self, name):
        if name not in self.inputs:
            raise VggcaffeError(f"{name!r} is not one of the Transformer's inputs ({', '.join(self.inputs)})")

    def set_transpose(self, name, order):
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise VggcaffeError(f"transpose order {tuple(order)} must give the {len(self.inputs[name]) - 1} "
                                f"dimensions of one input")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name, order):
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise VggcaffeError(f"channel swap {tuple(order)} must give the {self.inputs[name][1]} channels")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name, scale):
        self._check(name)
        self.raw_scale[name] = scale

    def set_input_scale(self, name, scale):
        self._check(name)
        self.input_scale[name] = scale

    def set_mean(self, name, mean):
        """A mean per channel (C,) or a mean image (C, H, W) of the input's size."""
        self._check(name)
        mean = np.asarray(mean, np.float32)
        shape = self.inputs[name][1:]
        if mean.ndim == 1:
            if mean.shape[0] != shape[0]:
                raise VggcaffeError(f"mean has {mean.shape[0]} values for {shape[0]} channels")
            mean = mean[:, None, None]
        elif mean.shape != tuple(shape):
            raise VggcaffeError(f"mean shape {mean.shape} is not the input's {tuple(shape)}")
        self.mean[name] = mean

    def preprocess(self, name, data):
        """An image (H x W x K, as load_image gives) -> the net's input layout (K x H' x W')."""
        self._check(name)
        x = np.asarray(data, np.float32)
        if x.shape[:2] != self.inputs[name][2:]:
            x = resize_image(x, self.inputs[name][2:])
        if name in self.transpose:
            x = x.transpose(self.transpose[name])
        if name in self.channel_swap:
            x = x[list(self.channel_swap[name])]
        if name in self.raw_scale:
            x = x * self.raw_scale[name]
        if name in self.mean:
            x = x - self.mean[name]
        if name in self.input_scale:
            x = x * self.input_scale[name]
        return np.ascontiguousarray(x, np.float32)

    def deprocess(self, name, data):
        """The inverse of preprocess (but the resize): the net's layout -> H x W x K."""
        self._check(name)
        x = np.array(data, np.float32).squeeze()
        if name in self.input_scale:
            x /= self.input_scale[name]
        if name in self.mean:
            x += self.mean[name]
        if name in self.raw_scale:
            x /= self.raw_scale[name]
        if name in self.channel_swap:
            x = x[np.argsort(self.channel_swap[name])]
        if name in self.transpose:
            x = x.transpose(np.argsort(self.transpose[name]))
        return x
