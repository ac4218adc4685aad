"""Localisation (appendix A): regressor nets made from a classifier, the Localiser, the errors, the CLI."""
import numpy as np
import pytest
from google.protobuf import text_format

from tests.test_boxes import make_box_folder
from tests.test_evaluate import TRAIN_VAL
from vggcaffe.boxes import BoxSet, decode, iou
from vggcaffe.cli import main
from vggcaffe.data.transforms import Transformer
from vggcaffe.evaluate import Model
from vggcaffe.localize import Localiser, evaluate_localisation, localisation_net, total_stride
from vggcaffe.net import Net
from vggcaffe.prototxt import read_net
from vggcaffe.solver import SGDSolver
from vggcaffe.proto import caffe_pb2
from vggcaffe.surgery import deploy_from_train_val


@pytest.fixture
def boxes(tmp_path):
    return make_box_folder(tmp_path)


@pytest.fixture
def classifier(tmp_path):
    """(train_val path, weights): the tiny 5-class net of test_evaluate (crop 8, stride 2)."""
    npz = tmp_path / "set.npz"
    np.savez(npz, x_test=np.zeros((2, 12, 16, 3), np.uint8), y_test=np.zeros(2, np.int64))
    model = tmp_path / "tiny_train_val.prototxt"
    model.write_text(TRAIN_VAL % {"npz": npz, "train": ""})
    weights = tmp_path / "classifier.npz"
    Net(deploy_from_train_val(read_net(model)), phase="TEST", dtype=np.float64, seed=1).save(weights)
    return model, weights


@pytest.mark.parametrize("per_class, finetune", [(True, "all"), (False, "fc")])
def test_regressor_net_is_the_classifier_with_a_box_head(boxes, classifier, per_class, finetune):
    model, weights = classifier
    net = localisation_net(model, boxes, per_class=per_class, finetune=finetune, batch_size=6)
    layers = {lp.name: lp for lp in net.layer}
    assert [lp.type for lp in net.layer[:2]] == ["Python", "Python"]
    assert list(net.layer[0].top) == (["data", "label", "box"] if per_class else ["data", "box"])
    assert layers["fc8_loc"].inner_product_param.num_output == (20 if per_class else 4)
    assert "fc8" not in layers and ("box_pred" in layers) == per_class
    assert [p.lr_mult for p in layers["conv1"].param] == ([] if finetune == "all" else [0, 0])
    assert layers["loss"].type == "EuclideanLoss" and layers["box_accuracy"].include[0].phase == caffe_pb2.TEST
    param = caffe_pb2.SolverParameter(net_param=net, base_lr=0.05, momentum=0.9, lr_policy="fixed", max_iter=40,
                                      test_iter=[1], test_interval=40, random_seed=1, snapshot_after_train=False)
    solver = SGDSolver(param, dtype=np.float64)
    solver.net.copy_from(weights)
    np.testing.assert_array_equal(solver.net.params["fc6"][0].data, Net(
        deploy_from_train_val(read_net(model)), weights=str(weights), dtype=np.float64).params["fc6"][0].data)
    conv = solver.net.params["conv1"][0].data.copy()
    first = solver.net.forward_loss()
    solver.step(40)
    assert solver.net.forward_loss() < first / 2
    assert np.array_equal(solver.net.params["conv1"][0].data, conv) == (finetune == "fc")


def fixed_regressor(tmp_path, boxes, classifier, per_class, bias):
    """A trained-looking regressor whose fc8_loc ignores its input and answers `bias`."""
    model, weights = classifier
    path = tmp_path / "loc_train_val.prototxt"
    path.write_text(text_format.MessageToString(localisation_net(model, boxes, per_class=per_class, batch_size=6)))
    net = Net(deploy_from_train_val(read_net(path), prob=False), weights=str(weights), dtype=np.float64)
    net.params["fc8_loc"][0].data[...] = 0
    net.params["fc8_loc"][1].data[...] = bias
    out = tmp_path / "loc.npz"
    net.save(out)
    return path, out


def test_localiser_places_each_locations_box_in_its_window(tmp_path, boxes, classifier):
    bias = np.tile([0.5, 0.5, 0.5, 0.25], 5) + np.repeat(np.arange(5) * 0.01, 4)
    path, weights = fixed_regressor(tmp_path, boxes, classifier, True, bias)
    loc = Localiser(path, weights)
    assert (loc.groups, loc.stride, loc.model.crop, loc.train_scale) == (5, 2, 8, 8)
    image = BoxSet(boxes, "train").images[0]                      # 20 x 24
    # centre crop at S = 8: the image is 8 x 10, the window starts at column 1
    box = decode(bias[8:12], 8) + [1, 0, 1, 0]
    np.testing.assert_allclose(loc.central(image, 2), box * [2.4, 2.5, 2.4, 2.5])
    maps, inside = loc.dense(image, 12)                           # 12 x 14: a 3 x 4 map at stride 2
    assert maps.shape == (5, 3, 4, 4) and np.all(inside == 1)
    for i, j in [(0, 0), (2, 3), (1, 2)]:
        expected = (decode(bias[4:8], 8) + [2 * j, 2 * i, 2 * j, 2 * i]) * [24 / 14, 20 / 12, 24 / 14, 20 / 12]
        np.testing.assert_allclose(maps[1, i, j], np.clip(expected, 0, [24, 20, 24, 20]))
    _, inside = loc.dense(image, 13)        # 13 x 16: ceil-mode pooling adds a 4th row, its windows at row 6
    np.testing.assert_allclose(inside, [[1] * 5] * 3 + [[7 / 8] * 5])


def test_localisation_errors_of_a_regressor_that_answers_the_whole_window(tmp_path, boxes, classifier):
    path, weights = fixed_regressor(tmp_path, boxes, classifier, False, [0.5, 0.5, 1, 1])
    model, cls_weights = classifier
    s = BoxSet(boxes, "val")
    errors = evaluate_localisation(Localiser(path, weights), Model(model, cls_weights), s)
    # at Q = S = 8 the map has a single location whose window is the centre crop
    whole = [iou([0, 0, im.shape[1], im.shape[0]], b).max() < 0.5 for im, b in zip(s.images, s.boxes)]
    assert errors["whole image"] == np.mean(whole)
    centre = []
    for im, b in zip(s.images, s.boxes):
        h, w = im.shape[:2]
        sh, sw = Transformer.rescaled_size(h, w, 8)
        r, c = (sh - 8) // 2, (sw - 8) // 2
        centre.append(iou(np.array([c, r, c + 8, r + 8]) * [w / sw, h / sh, w / sw, h / sh], b).max() < 0.5)
    assert errors["central crop, ground-truth class"] == np.mean(centre)
    assert errors["dense, ground-truth class"] == np.mean(centre)
    assert errors["dense, top-5 classes"] >= errors["dense, ground-truth class"]
    assert errors["classification top-5"] == 0.0                         # 5 classes
    assert 0 < np.mean(centre) < 1


def test_total_stride_multiplies_conv_and_pool_strides(classifier):
    net = deploy_from_train_val(read_net(classifier[0]))
    assert total_stride(net) == 2
    net.layer[1].convolution_param.stride.append(3)
    assert total_stride(net) == 6


def test_cli_makes_trains_and_scores_a_regressor(tmp_path, boxes, classifier, capsys, monkeypatch):
    model, weights = classifier
    monkeypatch.chdir(tmp_path)
    assert main(["localize_net", "--model", str(model), "--source", str(boxes), "--batch", "3",
                 "--max-iter", "4", "-o", "reg"]) == 0
    solver = (tmp_path / "reg_solver.prototxt").read_text()
    assert "test_iter: 1" in solver and "base_lr: 0.001" in solver and 'snapshot_prefix: "snapshots/reg"' in solver
    assert main(["train", "--solver", "reg_solver.prototxt", "--weights", str(weights)]) == 0
    capsys.readouterr()
    assert main(["localize", "--model", "reg_train_val.prototxt", "--weights", "snapshots/reg_iter_4.npz",
                 "--classifier", str(weights), "--classifier-model", str(model), "--scales", "8,12"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-6].split() == ["method", "error"] and lines[-1].startswith("classification top-5")
    assert main(["localize_net", "--model", str(model), "--source", str(tmp_path / "nowhere"), "-o", "x"]) == 1
    assert "nowhere/val.txt: no such file" in capsys.readouterr().err


def test_fused_regressors_pool_their_boxes_before_merging(tmp_path, boxes, classifier, monkeypatch):
    path, weights = fixed_regressor(tmp_path, boxes, classifier, False, [0.5, 0.5, 1, 1])
    model, cls_weights = classifier
    s, loc, cls = BoxSet(boxes, "val"), Localiser(path, weights), Model(model, cls_weights)
    import vggcaffe.localize as localize
    sizes, merge = [], localize.merge_boxes
    monkeypatch.setattr(localize, "merge_boxes", lambda b, w, t: sizes.append(len(b)) or merge(b, w, t))
    one = evaluate_localisation(loc, cls, s, [8, 13])
    one_sizes, sizes[:] = list(sizes), []
    two = evaluate_localisation([loc, loc], cls, s, [8, 13])
    assert one == two                                      # the same boxes twice merge to the same box
    assert sizes == [2 * n for n in one_sizes]              # central and dense: both regressors' boxes
