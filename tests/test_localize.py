"""Localisation (appendix A): box maths, greedy merging, the BoxData layer, regressor nets, testing."""
import json

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from tests.test_evaluate import TRAIN_VAL
from vggcaffe.cli import main
from vggcaffe.errors import VggcaffeError
from vggcaffe.data.transforms import Transformer
from vggcaffe.evaluate import Model
from vggcaffe.localize import (BoxSet, Localiser, decode, encode, evaluate_localisation, iou, localisation_net,
                               merge_boxes, total_stride)
from vggcaffe.net import Net
from vggcaffe.prototxt import parse_text, read_net
from vggcaffe.solver import SGDSolver
from vggcaffe.proto import caffe_pb2
from vggcaffe.surgery import deploy_from_train_val

SIZES = [(20, 24), (16, 16), (18, 30)]          # (H, W) of the box images


@pytest.fixture
def boxes(tmp_path):
    """A box folder: 6 images of 3 sizes, 5 classes, one or two boxes each; train = val."""
    rng = np.random.default_rng(0)
    root = tmp_path / "boxes"
    rows, listing = ["file\tclass_index\txmin\tymin\txmax\tymax"], []
    for i in range(6):
        h, w = SIZES[i % 3]
        name = f"images/im{i}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        if i % 3 == 0:                        # a box over most of the image
            rows.append(f"{name}\t{i % 5}\t1\t0\t{w - 1}\t{h}")
        for _ in range(i % 3):
            x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            x1, y1 = rng.uniform(x0 + 2, w), rng.uniform(y0 + 2, h)
            rows.append(f"{name}\t{i % 5}\t{x0:.2f}\t{y0:.2f}\t{x1:.2f}\t{y1:.2f}")
        listing.append(f"{name} {i % 5}")
    (root / "boxes.tsv").write_text("\n".join(rows) + "\n")
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("\n".join(listing) + "\n")
    return root


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


def test_iou_encode_decode():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou(a, b), [[1, 1 / 3, 0]] * 2)
    box = np.array([4.0, 6.0, 20.0, 14.0])
    np.testing.assert_allclose(encode(box, 32), [12 / 32, 10 / 32, 16 / 32, 8 / 32])
    np.testing.assert_allclose(decode(encode(box, 32), 32), box)


def test_merging_averages_overlapping_boxes_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
    merged, scores = merge_boxes(boxes, [0.3, 0.1, 0.35])
    np.testing.assert_allclose(merged[0], [0.25, 0.25, 10.25, 10.25])        # (0.3 * b0 + 0.1 * b1) / 0.4
    np.testing.assert_allclose(scores, [0.4, 0.35])
    np.testing.assert_allclose(merged[1], boxes[2])
    assert len(merge_boxes(boxes, [0.3, 0.1, 0.35], merge_iou=0.9)[0]) == 3  # IoU 0.68 < 0.9: kept apart


def test_box_set_reads_listing_and_table(boxes):
    s = BoxSet(boxes, "train")
    assert len(s) == 6 and list(s.labels) == [0, 1, 2, 3, 4, 0]
    assert [len(b) for b in s.boxes] == [1, 1, 2, 1, 1, 2] and s.images[2].shape == (18, 30, 3)
    (boxes / "val.txt").write_text("images/missing.png 0\n")
    with pytest.raises(VggcaffeError, match=r"val.txt:1: images/missing.png has no box in .*boxes.tsv"):
        BoxSet(boxes, "val")


def data_layer(boxes, phase, scales="", mirror=True, tops=3):
    """The BoxData layer in a net of its own: crop 8."""
    top = " ".join(f'top: "{t}"' for t in (["data", "label", "box"] if tops == 3 else ["data", "box"]))
    text = f'''name: "d" layer {{ name: "data" type: "Python" {top}
      transform_param {{ crop_size: 8 mirror: {str(mirror).lower()} {scales} mean_value: 100 scale: 0.02 }}
      python_param {{ module: "vggcaffe.localize" layer: "BoxData"
        param_str: '{json.dumps({"source": str(boxes), "split": "train", "batch_size": 6, "shuffle": False})}' }} }}'''
    return Net(parse_text(text, caffe_pb2.NetParameter()), phase=phase, dtype=np.float64, seed=3)


def expected_sample(s, i, offset=None, crop=8):
    """(crop at S = crop, target) of image i, computed here from the definitions: the centre
    crop, or the one at `offset` (row, column)."""
    h, w = s.images[i].shape[:2]
    sh, sw = Transformer.rescaled_size(h, w, crop)
    img = np.asarray(Image.fromarray(s.images[i]).resize((sw, sh), Image.BICUBIC), np.float64)
    r, c = offset or ((sh - crop) // 2, (sw - crop) // 2)
    x = ((img - 100) * 0.02).transpose(2, 0, 1)[:, r:r + crop, c:c + crop]
    b = s.boxes[i] * [sw / w, sh / h, sw / w, sh / h] - [c, r, c, r]
    inside = np.clip(b, 0, crop)
    return x, encode(b[np.argmax((inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1]))], crop)


def test_box_data_test_phase_gives_centre_crops_and_largest_box_inside(boxes):
    net = data_layer(boxes, "TEST")
    out = net.forward()
    s = BoxSet(boxes, "train")
    np.testing.assert_array_equal(out["label"], s.labels)
    for i in range(6):
        x, t = expected_sample(s, i)
        np.testing.assert_allclose(net.blobs["data"].data[i], x, atol=1e-9)
        np.testing.assert_allclose(out["box"][i], t, atol=1e-12)


def test_box_data_train_phase_crops_and_mirrors_image_and_box_together(boxes):
    net, s = data_layer(boxes, "TRAIN"), BoxSet(boxes, "train")
    seen = {"plain": set(), "mirror": set()}
    for _ in range(6):
        out = net.forward()                   # no shuffle: sample k is image k
        for k in range(6):
            x, t = net.blobs["data"].data[k], out["box"][k]
            found = []
            width = Transformer.rescaled_size(*s.images[k].shape[:2], 8)[1]     # 10, 8 or 13; height 8
            for c in range(width - 8 + 1):
                e_x, e_t = expected_sample(s, k, (0, c))
                if np.allclose(x, e_x, atol=1e-9) and np.allclose(t, e_t):
                    found.append(("plain", c))
                if np.allclose(x, e_x[..., ::-1], atol=1e-9) and np.allclose(t, [1 - e_t[0], *e_t[1:]]):
                    found.append(("mirror", c))
            assert found, f"sample {k} is no window of image {k} (nor its mirror) with the box to match"
            seen[found[0][0]].add(found[0][1])
    assert seen["plain"] and seen["mirror"] and len(seen["plain"] | seen["mirror"]) > 2     # random columns


def test_box_data_jittered_crops_target_whole_boxes_that_meet_the_window(boxes):
    net = data_layer(boxes, "TRAIN", scales="scale_min: 10 scale_max: 16", tops=2)
    beyond = 0
    for _ in range(5):
        corners = decode(net.forward()["box"], 8)
        assert np.all(corners[:, 2:] > corners[:, :2]) and np.all(corners[:, :2] < 8) and np.all(corners[:, 2:] > 0)
        beyond += np.sum((corners < -1e-9) | (corners > 8 + 1e-9))
    assert beyond > 0                         # boxes reaching out of the window are not clipped


@pytest.mark.parametrize("param_str, transform, message", [
    ("{}", "crop_size: 8", 'param_str needs "source"'),
    ("nope", "crop_size: 8", "param_str is not JSON"),
    ('{"source": "x"}', "", "transform_param needs crop_size"),
    ('{"source": "x"}', "crop_size: 8 crop_pad: 2", "transform_param cannot take crop_pad")])
def test_box_data_errors(param_str, transform, message):
    text = f'''name: "d" layer {{ name: "data" type: "Python" top: "data" top: "box" transform_param {{ {transform} }}
      python_param {{ module: "vggcaffe.localize" layer: "BoxData" param_str: '{param_str}' }} }}'''
    with pytest.raises(VggcaffeError, match=f"'data' \\(BoxData\\): {message}"):
        Net(parse_text(text, caffe_pb2.NetParameter()))


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
