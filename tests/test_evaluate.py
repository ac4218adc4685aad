"""Dense / multi-crop / multi-scale / combined / fused testing and top-k error (vggcaffe/evaluate.py).

A tiny net (8 px crops, 5 classes) on random 12x16 images: every method is
checked against a brute-force recomputation with the FC or converted net.
"""
import numpy as np
import pytest

from vggcaffe.cli import main
from vggcaffe.errors import VggcaffeError
from vggcaffe.evaluate import (Model, ImageSet, crop_grid, default_scales, error_rows, evaluate, extract_crops,
                               infer_model, topk_error)
from vggcaffe.net import Net
from vggcaffe.prototxt import parse_text, read_net
from vggcaffe.proto import caffe_pb2
from vggcaffe.surgery import deploy_from_train_val

MEAN, SCALE, CROP = (100.0, 110.0, 120.0), 0.02, 8

TRAIN_VAL = """name: "tiny"
layer { name: "data" type: "NpzData" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 8 mirror: true %(train)s mean_value: 100 mean_value: 110 mean_value: 120 scale: 0.02 }
  npz_data_param { source: "%(npz)s" split: "test" batch_size: 4 } }
layer { name: "data" type: "NpzData" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 8 mean_value: 100 mean_value: 110 mean_value: 120 scale: 0.02 }
  npz_data_param { source: "%(npz)s" split: "test" batch_size: 4 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4
  kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6" inner_product_param { num_output: 6
  weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc6" top: "fc8" inner_product_param { num_output: 5
  weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc8" bottom: "label" top: "accuracy" include { phase: TEST } }
"""


@pytest.fixture
def setup(tmp_path):
    """(tmp_path, model path, [weights paths], images, labels): 10 random images, two trained-looking nets."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 12, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=10)
    npz = tmp_path / "set.npz"
    np.savez(npz, x_test=images, y_test=labels)
    model = tmp_path / "tiny_train_val.prototxt"
    model.write_text(TRAIN_VAL % {"npz": npz, "train": "scale_min: 10 scale_max: 14"})
    deploy = deploy_from_train_val(read_net(model))
    weights = []
    for seed in (1, 2):
        path = tmp_path / f"w{seed}.npz"
        Net(deploy, phase="TEST", dtype=np.float64, seed=seed).save(path)
        weights.append(path)
    return tmp_path, model, weights, images, labels


def fc_posteriors(model, x):
    return model.fc_net.forward(data=x)["prob"].copy()


def test_topk_error_counts_ties_as_wrong():
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]])
    labels = np.array([0, 1, 0, 2])
    assert topk_error(probs, labels, 1) == 0.5            # row 0: a tie; row 2: 0.4 is higher
    assert topk_error(probs, labels, 2) == 0.25           # row 2: two others >= 0.3
    assert topk_error(probs, labels, 3) == 0.0


def test_crop_grid_covers_corners_and_centre():
    offsets = crop_grid(40, 52, 32, 5)
    assert offsets.shape == (25, 2)
    for corner in [(0, 0), (0, 20), (8, 0), (8, 20)]:
        assert corner in map(tuple, offsets)
    assert tuple(offsets[12]) == ((40 - 32) // 2, (52 - 32) // 2)     # the centre is Caffe's centre crop
    assert sorted(set(offsets[:, 0])) == [0, 2, 4, 6, 8] and sorted(set(offsets[:, 1])) == [0, 5, 10, 15, 20]
    assert tuple(crop_grid(41, 41, 32, 1)[0]) == (4, 4)
    with pytest.raises(VggcaffeError, match="smaller than the crop"):
        crop_grid(30, 40, 32, 5)


def test_crops_are_windows_and_exact_mirrors_150_for_3_scales():
    rng = np.random.default_rng(3)
    total = 0
    for q in (36, 40, 48):
        x = rng.normal(size=(2, 3, q, q + 7))
        offsets = crop_grid(q, q + 7, 32, 5)
        crops = extract_crops(x, offsets, 32)
        assert crops.shape == (2, 50, 3, 32, 32)
        np.testing.assert_array_equal(crops[:, 1::2], crops[:, 0::2][..., ::-1])
        for m, (r, c) in enumerate(offsets):
            np.testing.assert_array_equal(crops[:, 2 * m], x[:, :, r:r + 32, c:c + 32])
        total += crops.shape[1]
    assert total == 150


def test_default_scales_follow_the_paper():
    t = caffe_pb2.TransformationParameter
    assert default_scales(t(scale_min=256), 224) == [224, 256, 288]
    assert default_scales(t(scale_min=384), 224) == [352, 384, 416]
    assert default_scales(t(scale_min=256, scale_max=512), 224) == [256, 384, 512]
    assert default_scales(t(scale_min=36), 32) == [32, 36, 41]
    assert default_scales(t(), 32) == [None]
    assert default_scales(t(scale_min=32), 32) == [32, 37]


def test_prepare_rescales_and_normalises(setup):
    _, model_path, weights, images, _ = setup
    model = Model(model_path, weights[0], dtype=np.float64)
    assert model.scales == [10, 12, 14] and model.crop == CROP
    x = model.prepare(images[:2], None)
    want = (images[:2].transpose(0, 3, 1, 2) - np.array(MEAN)[:, None, None]) * SCALE
    np.testing.assert_allclose(x, want)
    assert model.prepare(images[:2], 9).shape == (2, 3, 9, 12)


@pytest.mark.parametrize("q", [9, 12])
def test_multi_crop_is_the_mean_over_all_crops_and_mirrors(setup, q):
    """q = 9 leaves 1 px of slack, so windows repeat: they are run once and weighted."""
    _, model_path, weights, images, _ = setup
    model = Model(model_path, weights[0], dtype=np.float64)
    x = model.prepare(images[:3], q)
    crops = extract_crops(x, crop_grid(x.shape[2], x.shape[3], CROP, 5), CROP)      # (3, 50, C, 8, 8)
    want = np.mean([fc_posteriors(model, crops[:, m]) for m in range(50)], axis=0)
    np.testing.assert_allclose(model.multi_crop(x, 5), want, rtol=1e-10)


def test_dense_averages_the_map_and_the_mirror(setup):
    _, model_path, weights, images, _ = setup
    model = Model(model_path, weights[0], dtype=np.float64)
    x = model.prepare(images[:3], 12)
    maps = [model.conv_net.forward(data=np.ascontiguousarray(v))["prob"].copy() for v in (x, x[..., ::-1])]
    assert maps[0].shape == (3, 5, 3, 5)                # 12x16 -> pool 6x8 -> 4x4 kernel
    want = (maps[0].mean(axis=(2, 3)) + maps[1].mean(axis=(2, 3))) / 2
    np.testing.assert_allclose(model.dense(x, flip=True), want, rtol=1e-10)
    crop = x[:, :, 2:10, 4:12]                          # a crop-size input: dense = the FC net
    np.testing.assert_allclose(model.dense(np.ascontiguousarray(crop), flip=False), fc_posteriors(model, crop),
                               rtol=1e-10)


def test_evaluate_multi_scale_combination_and_fusion(setup):
    _, model_path, weights, images, labels = setup
    models = [Model(model_path, w, dtype=np.float64) for w in weights]
    data = ImageSet(setup[0] / "set.npz")
    res = evaluate(models, data, scales=[8, 12], flip=True, combine=True, grid=3, batch=4)
    assert set(res) == {"w1", "w2", "fusion"}
    m = models[0]
    want = np.mean([m.dense(m.prepare(images, q), True) for q in (8, 12)], axis=0)
    np.testing.assert_allclose(res["w1"]["dense"], want, rtol=1e-10)
    want_mc = np.mean([m.multi_crop(m.prepare(images, q), 3) for q in (8, 12)], axis=0)
    np.testing.assert_allclose(res["w1"]["multi-crop"], want_mc, rtol=1e-10)
    np.testing.assert_allclose(res["w1"]["dense+multi-crop"], (want + want_mc) / 2, rtol=1e-10)
    np.testing.assert_allclose(res["fusion"]["dense"], (res["w1"]["dense"] + res["w2"]["dense"]) / 2)
    rows = error_rows(res, labels)
    assert len(rows) == 9 and rows[0][2] == topk_error(res["w1"]["dense"], labels, 1)


def test_cli_dense_multi_crop_combine_fuse(setup, capsys):
    tmp, model_path, weights, _, labels = setup
    assert main(["test", "--model", str(model_path), "--weights", str(weights[0]), "--dense", "--flip",
                 "--combine", "--scales", "10,12", "--fuse", f"{model_path}:{weights[1]}", "--grid", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("model"))):]
    assert [line.split()[:2] for line in table[1:]] == [
        [n, m] for n in ("w1", "w2", "fusion") for m in ("dense", "multi-crop", "dense+multi-crop")]


def test_cli_without_new_flags_keeps_iterations_scoring(setup, capsys):
    _, model_path, weights, _, _ = setup
    assert main(["test", "--model", str(model_path), "--weights", str(weights[0]), "--iterations", "2"]) == 0
    log = capsys.readouterr().err
    assert "accuracy = " in log and "] Loss: " in log                    # caffe test's summary lines


def test_infer_model_from_sidecar_or_solver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.npz").write_bytes(b"")
    (tmp_path / "net.prototxt").write_text('name: "n"')
    assert infer_model(tmp_path / "net.npz") == str(tmp_path / "net.prototxt")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/X_solver.prototxt").write_text('net: "models/X_train_val.prototxt" snapshot_prefix: "snap/x"')
    assert infer_model("snap/x_iter_100.npz") == "models/X_train_val.prototxt"
    with pytest.raises(VggcaffeError, match="give --model"):
        infer_model("snap/y_iter_100.npz")
    (tmp_path / "models/Y_solver.prototxt").write_text('net: "models/Y_train_val.prototxt" snapshot_prefix: "snap/x"')
    with pytest.raises(VggcaffeError, match="several solvers"):
        infer_model("snap/x_iter_100.npz")


def test_cli_infers_model_and_source_from_snapshot_name(setup, tmp_path, monkeypatch, capsys):
    _, model_path, weights, _, _ = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/t_solver.prototxt").write_text(f'net: "{model_path}" snapshot_prefix: "snap/t"')
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap/t_iter_7.npz").write_bytes(weights[0].read_bytes())
    assert main(["test", "--weights", "snap/t_iter_7.npz", "--dense"]) == 0
    assert "t_iter_7  dense" in capsys.readouterr().out


def test_fully_conv_rejects_a_net_without_input():
    with pytest.raises(VggcaffeError, match="Input"):
        from vggcaffe.surgery import fully_convolutional
        fully_convolutional(parse_text('name: "x"', caffe_pb2.NetParameter()), {})


@pytest.mark.parametrize("label", [5, -1])
def test_a_label_outside_the_nets_classes_names_the_listing_line(setup, capsys, label):
    tmp, model_path, weights, images, _ = setup
    from PIL import Image
    Image.fromarray(images[0]).save(tmp / "a.png")
    (tmp / "list.txt").write_text(f"a.png 1\na.png {label}\n")
    assert main(["test", "--model", str(model_path), "--weights", str(weights[0]), "--dense",
                 "--source", str(tmp / "list.txt"), "--root-folder", str(tmp) + "/"]) == 1
    assert f"list.txt:2): label {label} is not one of the 5 classes of w1" in capsys.readouterr().err
