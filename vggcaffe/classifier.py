"""pycaffe's caffe.Classifier: a deploy net that takes images and gives class posteriors.

    net = vggcaffe.Classifier("models/D_deploy.prototxt", "D.npz", image_dims=(256, 256),
                              mean=np.array([123.68, 116.78, 103.94]), raw_scale=255)
    probs = net.predict([vggcaffe.io.load_image("cat.jpg")])      # (1, 1000)

As in pycaffe: each image (H x W x K in [0, 1]) is resized to image_dims, then
either its centre crop of the input's size or pycaffe's 10 views (corners,
centre and their mirrors, `oversample=True`, averaged) go through the
Transformer (transpose to C x H x W, channel swap, raw_scale, mean,
input_scale) and the net; the first output is returned. The paper's own
evaluation (dense, multi-scale, 150 crops) is `vggcaffe test --dense`.
"""
import numpy as np

from . import io as caffe_io
from .net import Net


class Classifier(Net):

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None):
        super().__init__(model_file, "TEST", weights=pretrained_file)
        name = self.inputs[0]
        self.transformer = caffe_io.Transformer({name: self.blobs[name].shape})
        self.transformer.set_transpose(name, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(name, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(name, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(name, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(name, channel_swap)
        self.crop_dims = np.array(self.blobs[name].shape[2:])
        self.image_dims = np.array(image_dims if image_dims is not None else self.crop_dims)

    def predict(self, inputs, oversample=True):
        """Class posteriors (N, classes) of N images (H x W x K, floats in [0, 1])."""
        resized = np.stack([caffe_io.resize_image(im, self.image_dims) for im in inputs])
        if oversample:
            views = caffe_io.oversample(resized, self.crop_dims)
        else:
            top, left = (self.image_dims - self.crop_dims) // 2
            views = resized[:, top:top + self.crop_dims[0], left:left + self.crop_dims[1]]
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, view) for view in views])
        predictions = self.forward_all(**{name: batch})[self.outputs[0]].reshape(len(views), -1)
        if oversample:
            predictions = predictions.reshape(len(inputs), 10, -1).mean(axis=1)
        return predictions
