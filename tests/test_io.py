"""pycaffe's caffe.io and caffe.Classifier: Transformer's preprocess/deprocess against the steps written out,
load_image, resize_image, the 10-view oversample, and Classifier.predict recomputed from them."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggcaffe
from vggcaffe.errors import VggcaffeError


def test_preprocess_is_pycaffes_sequence_and_deprocess_undoes_it():
    rng = np.random.default_rng(0)
    image = rng.random((5, 7, 3)).astype(np.float32)              # H x W x C in [0, 1], the input's size
    t = vggcaffe.io.Transformer({"data": (1, 3, 5, 7)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    mean = np.array([10.0, 20.0, 30.0])
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    out = t.preprocess("data", image)
    expected = ((image.transpose(2, 0, 1)[[2, 1, 0]] * 255) - mean[:, None, None]) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(t.deprocess("data", out[None]), image, rtol=1e-5, atol=1e-6)


def test_preprocess_resizes_to_the_input_and_checks_its_settings():
    t = vggcaffe.io.Transformer({"data": (2, 3, 4, 6)})
    t.set_transpose("data", (2, 0, 1))
    assert t.preprocess("data", np.ones((8, 12, 3))).shape == (3, 4, 6)
    with pytest.raises(VggcaffeError, match="mean has 2 values for 3 channels"):
        t.set_mean("data", [1, 2])
    with pytest.raises(VggcaffeError, match=r"mean shape \(3, 5, 5\) is not the input's \(3, 4, 6\)"):
        t.set_mean("data", np.zeros((3, 5, 5)))
    with pytest.raises(VggcaffeError, match="'label' is not one of the Transformer's inputs"):
        t.set_raw_scale("label", 255)


def test_load_image_resize_and_oversample(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    im = vggcaffe.io.load_image(str(tmp_path / "a.png"))
    np.testing.assert_allclose(im, pixels / 255, rtol=1e-6)
    assert vggcaffe.io.load_image(str(tmp_path / "a.png"), color=False).shape == (6, 8, 1)
    np.testing.assert_array_equal(vggcaffe.io.resize_image(im, (12, 16), interp_order=0)[::2, ::2], im)
    crops = vggcaffe.io.oversample([im], (4, 4))
    assert crops.shape == (10, 4, 4, 3)
    np.testing.assert_array_equal(crops[0], im[:4, :4])
    np.testing.assert_array_equal(crops[3], im[2:, 4:])
    np.testing.assert_array_equal(crops[4], im[1:5, 2:6])                  # the centre
    np.testing.assert_array_equal(crops[5:], crops[:5][:, :, ::-1])       # the mirrors
    with pytest.raises(VggcaffeError, match="smaller than the crop"):
        vggcaffe.io.oversample([im], (7, 4))
    assert Path(vggcaffe.io.__file__).name == "io.py"


def test_classifier_predicts_the_mean_of_the_ten_views_or_the_centre_crop(tmp_path):
    from vggcaffe.net import Net
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
                      'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                      'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }\n'
                      'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    Net(str(deploy), seed=1).save(tmp_path / "w.npz")
    mean = np.array([0.1, 0.2, 0.3])
    clf = vggcaffe.Classifier(str(deploy), str(tmp_path / "w.npz"), image_dims=(6, 6), mean=mean, raw_scale=2,
                              channel_swap=(2, 1, 0))
    images = [np.random.default_rng(i).random((9, 7, 3)).astype(np.float32) for i in range(2)]
    net = Net(str(deploy), "TEST", weights=str(tmp_path / "w.npz"))

    def posteriors(view):                                   # the Transformer's steps, written out
        x = view.transpose(2, 0, 1)[[2, 1, 0]] * 2 - mean[:, None, None]
        return net.forward(data=x[None].astype(np.float32))["prob"][0].copy()
    resized = [vggcaffe.io.resize_image(im, (6, 6)) for im in images]
    ten = [np.mean([posteriors(v) for v in vggcaffe.io.oversample([r], (4, 4))], axis=0) for r in resized]
    np.testing.assert_allclose(clf.predict(images), ten, rtol=1e-5)
    centre = [posteriors(r[1:5, 1:5]) for r in resized]
    np.testing.assert_allclose(clf.predict(images, oversample=False), centre, rtol=1e-5)
