"""Deep-feature transfer (appendix B): descriptors of the fully-convolutional net, linear SVM."""
import numpy as np
import pytest

from tests.test_evaluate import TRAIN_VAL
from vggcaffe.cli import main
from vggcaffe.errors import VggcaffeError
from vggcaffe.evaluate import ImageSet
from vggcaffe.net import Net
from vggcaffe.prototxt import read_net
from vggcaffe.surgery import deploy_from_train_val
from vggcaffe.transfer import FeatureModel, descriptors, fit_svm, mean_class_recall, penultimate_blob


@pytest.fixture
def setup(tmp_path):
    """(model path, weights paths, npz path): a tiny net (fc6 of 6 is its descriptor) and 5 classes of images."""
    rng = np.random.default_rng(0)
    means = rng.integers(40, 216, size=(5, 1, 1, 3))
    y_train, y_test = np.repeat(np.arange(5), 4), np.repeat(np.arange(5), 2)
    noise = lambda n: rng.integers(-30, 31, size=(n, 12, 16, 3))          # noqa: E731
    npz = tmp_path / "set.npz"
    np.savez(npz, x_train=np.clip(means[y_train] + noise(20), 0, 255).astype(np.uint8), y_train=y_train,
             x_test=np.clip(means[y_test] + noise(10), 0, 255).astype(np.uint8), y_test=y_test)
    model = tmp_path / "tiny_train_val.prototxt"
    model.write_text(TRAIN_VAL % {"npz": npz, "train": "scale_min: 10 scale_max: 14"})
    weights = []
    for seed in (1, 2):
        weights.append(tmp_path / f"w{seed}.npz")
        Net(deploy_from_train_val(read_net(model)), phase="TEST", dtype=np.float64, seed=seed).save(weights[-1])
    return model, weights, npz


def test_the_descriptor_is_the_last_inner_products_input(setup):
    model, weights, _ = setup
    assert penultimate_blob(deploy_from_train_val(read_net(model))) == "fc6"
    assert FeatureModel(model, weights[0]).layer == "fc6"


def test_descriptor_is_the_mean_map_of_image_and_mirror_stacked_over_scales(setup):
    model, weights, npz = setup
    m = FeatureModel(model, weights[0], dtype=np.float64)
    images = ImageSet(npz, "test").source.images[:3]
    parts = []
    for q in (10, 14):
        x = m.prepare(images, q)
        maps = []
        for view in (x, x[..., ::-1]):
            m.conv_net.forward(data=np.ascontiguousarray(view))
            maps.append(m.conv_net.blobs["fc6"].data.copy())
        assert maps[0].shape[2:] == {10: (2, 4), 14: (4, 7)}[q]      # maps of several locations
        parts.append(np.mean([f.mean(axis=(2, 3)) for f in maps], axis=0))
    stacked = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(m.describe(images, [10, 14]), stacked / np.linalg.norm(stacked, axis=1, keepdims=True),
                               rtol=1e-12)
    averaged = np.mean(parts, axis=0)
    np.testing.assert_allclose(m.describe(images, [10, 14], aggregate="average"),
                               averaged / np.linalg.norm(averaged, axis=1, keepdims=True), rtol=1e-12)
    with pytest.raises(VggcaffeError, match="aggregate must be one of stack, average"):
        m.describe(images, [10], aggregate="max")


def test_fusion_stacks_each_models_unit_descriptor(setup):
    model, weights, npz = setup
    models = [FeatureModel(model, w, dtype=np.float64) for w in weights]
    images = ImageSet(npz, "test")
    fused = descriptors(models, images, [12], batch=4)
    assert fused.shape == (10, 12)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0)
    for i, m in enumerate(models):
        np.testing.assert_allclose(fused[:, 6 * i:6 * (i + 1)] * np.sqrt(2), descriptors([m], images, [12]),
                                   rtol=1e-12)


def test_mean_class_recall_weighs_classes_equally():
    labels, predicted = np.array([0, 0, 0, 0, 1]), np.array([0, 0, 0, 0, 0])
    assert mean_class_recall(labels, predicted) == 0.5
    assert np.mean(labels == predicted) == 0.8


def test_svm_separates_separable_classes_and_cross_validates_c():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 6)
    features = np.eye(4)[labels] * 3 + 0.1 * rng.standard_normal((24, 4))
    svm, c, scores = fit_svm(features, labels)
    assert set(scores) == {0.1, 1.0, 10.0, 100.0} and c == max(scores, key=scores.get)
    assert mean_class_recall(labels, svm.predict(features)) == 1.0
    with pytest.raises(VggcaffeError, match="2 training images of every class"):
        fit_svm(features[:5], np.array([0, 0, 1, 1, 2]))


def test_cli_prints_mean_class_recall_and_writes_descriptors(setup, tmp_path, capsys):
    model, weights, npz = setup
    out = tmp_path / "feats.npz"
    fuse = f"{model}:{weights[1]}"
    assert main(["transfer", "--model", str(model), "--weights", str(weights[0]), "--source", str(npz),
                 "--scales", "10,14", "--fuse", fuse, "--svm-c", "10", "--features", str(out)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "mean class recall" in header and row.startswith("w1+w2") and row.split()[1] == "24"
    with np.load(out) as f:
        assert f["x_train"].shape == (20, 24) and f["x_test"].shape == (10, 24)
        np.testing.assert_array_equal(f["y_test"], np.repeat(np.arange(5), 2))
    assert main(["transfer", "--model", str(model), "--weights", str(weights[0]), "--source", str(npz),
                 "--layer", "nope"]) == 1
    assert "the net has no blob 'nope'" in capsys.readouterr().err
