"""Boxes for localisation (appendix A): IoU and the box encoding, greedy merging, the box folder and BoxData."""
import json

import numpy as np
import pytest
from PIL import Image

from vggcaffe.boxes import BoxSet, decode, encode, iou, merge_boxes
from vggcaffe.data.transforms import Transformer
from vggcaffe.errors import VggcaffeError
from vggcaffe.net import Net
from vggcaffe.prototxt import parse_text
from vggcaffe.proto import caffe_pb2

SIZES = [(20, 24), (16, 16), (18, 30)]          # (H, W) of the box images


def make_box_folder(tmp_path):
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
def boxes(tmp_path):
    return make_box_folder(tmp_path)

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
      python_param {{ module: "vggcaffe.boxes" layer: "BoxData"
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
      python_param {{ module: "vggcaffe.boxes" layer: "BoxData" param_str: '{param_str}' }} }}'''
    with pytest.raises(VggcaffeError, match=f"'data' \\(BoxData\\): {message}"):
        Net(parse_text(text, caffe_pb2.NetParameter()))
