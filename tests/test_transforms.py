"""Tests for vggcaffe/data/transforms.py on real images: scale jitter, crops, flips,
PCA colour shift, mean subtraction, compute_pca."""
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from vggcaffe.data.image_io import load_image
from vggcaffe.data.transforms import Transformer, compute_pca, format_pca, to_gray
from vggcaffe.errors import VggcaffeError
from vggcaffe.proto import caffe_pb2

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "imagenette_32.npz").exists(),
                                reason=f"real test data not found at {DATA} (shared/data beside the clone)")


def transformer(text, phase="TRAIN", dtype=np.float32):
    return Transformer(text_format.Parse(text, caffe_pb2.TransformationParameter()), phase, "t", dtype)


@pytest.fixture(scope="module")
def x32():
    with np.load(DATA / "imagenette_32.npz", allow_pickle=False) as f:
        return f["x_train"]


def photo_paths():
    return sorted((DATA / "photos").glob("*.JPEG")) + sorted((DATA / "photos").glob("*.png"))


def window_matches(x, out_nhwc, size):
    """match[n, r, c]: out_nhwc[n] equals x[n] cropped at (r, c) (a slow reference)."""
    n, h, w = x.shape[:3]
    match = np.zeros((n, h - size + 1, w - size + 1), bool)
    for r in range(h - size + 1):
        for c in range(w - size + 1):
            match[:, r, c] = (x[:, r:r + size, c:c + size] == out_nhwc).all(axis=(1, 2, 3))
    return match


def test_scale_jitter_is_uniform_over_the_range():
    t = transformer("scale_min: 256 scale_max: 512")
    s = t.draw_scales(25700, np.random.default_rng(0))
    assert s.min() >= 256 and s.max() <= 512
    counts = np.bincount(s - 256, minlength=257)
    assert (counts > 0).all()
    chi2 = ((counts - 100.0) ** 2 / 100.0).sum()             # df 256: mean 256, sd 22.6
    assert chi2 < 256 + 6 * 22.6
    assert (transformer("scale_min: 256 scale_max: 512", "TEST").draw_scales(5, None) == 384).all()
    assert (transformer("scale_min: 256").draw_scales(5, None) == 256).all()


def test_rescale_sets_the_smaller_side_on_real_photos():
    t = transformer("scale_min: 64")
    for path in photo_paths()[::3]:
        img = load_image(path)
        out = t.rescale(img, 64)
        h, w = img.shape[:2]
        assert min(out.shape[:2]) == 64, path
        assert max(out.shape[:2]) == int(max(h, w) * 64 / min(h, w) + 0.5), path


def test_jittered_scale_reaches_the_output():
    img = load_image(DATA / "photos" / "n02815834_beaker.JPEG")       # 320x221
    t = transformer("scale_min: 40 scale_max: 48")
    rng = np.random.default_rng(3)
    sides = {min(t([img], rng).shape[2:]) for _ in range(150)}
    assert sides == set(range(40, 49))


def test_random_crops_lie_inside_and_cover_the_corners(x32):
    x = x32[:2000]
    out = transformer("crop_size: 24 mirror: false")(x, np.random.default_rng(5))
    assert out.shape == (2000, 3, 24, 24) and out.dtype == np.float32
    match = window_matches(x, out.transpose(0, 2, 3, 1), 24)
    assert match.any(axis=(1, 2)).all()                                 # every crop is a window
    first = match.reshape(len(x), -1).argmax(axis=1)
    counts = np.bincount(first, minlength=81).reshape(9, 9)
    assert (counts > 0).all()                                           # corners included
    assert counts[0, 0] and counts[0, 8] and counts[8, 0] and counts[8, 8]
    centre = transformer("crop_size: 24", "TEST")(x[:50], None)
    np.testing.assert_array_equal(centre, x[:50, 4:28, 4:28].transpose(0, 3, 1, 2))


def test_crop_pad_pads_with_zeros(x32):
    x = x32[:1500]
    out = transformer("crop_size: 32 crop_pad: 4")(x, np.random.default_rng(6))
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    match = window_matches(padded, out.transpose(0, 2, 3, 1), 32)
    assert match.any(axis=(1, 2)).all()
    assert match[:, 0, 0].any() and match[:, 8, 8].any()
    assert (out == 0).all(axis=(1, 2)).any()                            # some crops hold padding


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_mirror_flips_half_the_images_in_both_phases(x32, phase):
    x = x32[:4000]
    out = transformer("mirror: true", phase)(x, np.random.default_rng(7)).transpose(0, 2, 3, 1)
    same = (out == x).all(axis=(1, 2, 3))
    flipped = (out == x[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | flipped).all()
    usable = same ^ flipped                                             # skip mirror-symmetric images
    rate = flipped[usable].mean()
    assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / usable.sum())
    no_mirror = transformer("mirror: false", phase)(x[:100], np.random.default_rng(7))
    np.testing.assert_array_equal(no_mirror, x[:100].transpose(0, 3, 1, 2))


def test_compute_pca_on_real_data(x32):
    eigval, eigvec = compute_pca(x32)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-10)
    assert (eigval > 0).all() and (np.diff(eigval) <= 0).all()
    pixels = x32[:500].reshape(-1, 3) / 255.0
    val500, vec500 = compute_pca(iter([x32[:200], x32[200:500]]))
    np.testing.assert_allclose(vec500 @ np.diag(val500) @ vec500.T, 255 * np.cov(pixels.T, bias=True), rtol=1e-9)
    # close to fb.resnet.torch's ImageNet values (0..1 scale) x 255, as models/*_train_val.prototxt use them
    imagenet_val = 255 * np.array([0.2175, 0.0188, 0.0045])
    imagenet_vec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    assert ((eigval / imagenet_val > 0.6) & (eigval / imagenet_val < 1.5)).all()
    assert (np.abs((eigvec * imagenet_vec).sum(axis=0)) > 0.99).all()
    text = format_pca(eigval, eigvec)
    assert text.count("pca_eigval") == 3 and text.count("pca_eigvec") == 9


def test_colour_shift_is_zero_mean_constant_per_image_and_off_at_test(x32):
    eigval, eigvec = compute_pca(x32)
    pca = format_pca(eigval, eigvec).replace("\n", " ")
    x = x32[:2500]
    base = x.transpose(0, 3, 1, 2).astype(np.float64)
    diff = transformer(f"color_shift_std: 0.1 {pca}", "TRAIN", np.float64)(x, np.random.default_rng(8)) - base
    shift = diff[:, :, 0, 0]                                            # (N, 3)
    assert np.ptp(diff, axis=(2, 3)).max() < 1e-9                       # one shift per image and channel
    expected_cov = eigvec @ np.diag((0.1 * eigval) ** 2) @ eigvec.T           # in grey levels
    sd = np.sqrt(np.diag(expected_cov))
    assert (np.abs(shift.mean(axis=0)) < 5 * sd / np.sqrt(len(x))).all()
    np.testing.assert_allclose(np.cov(shift.T, bias=True), expected_cov, rtol=0.15, atol=0.02 * sd.max() ** 2)
    test = transformer(f"color_shift_std: 0.1 {pca}", "TEST", np.float64)(x[:100], np.random.default_rng(8))
    np.testing.assert_array_equal(test, base[:100])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_value_and_scale(x32, dtype):
    x = x32[:64]
    out = transformer("crop_size: 24 mean_value: 120 mean_value: 115 mean_value: 100 scale: 0.5",
                      "TEST", dtype)(x, None)
    ref = (x[:, 4:28, 4:28].transpose(0, 3, 1, 2) - np.array([120, 115, 100.0])[:, None, None]) * 0.5
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref, rtol=1e-6 if dtype == np.float32 else 1e-15)
    one = transformer("mean_value: 100", "TEST", dtype)(x, None)
    np.testing.assert_array_equal(one, x.transpose(0, 3, 1, 2) - dtype(100))


@pytest.mark.parametrize("suffix", [".binaryproto", ".npy"])
def test_mean_file_is_cropped_at_the_same_place(x32, tmp_path, suffix):
    mean = x32[0].transpose(2, 0, 1).astype(np.float64)                # (C, H, W)
    path = tmp_path / f"mean{suffix}"
    if suffix == ".npy":
        np.save(path, mean)
    else:
        blob = caffe_pb2.BlobProto(data=mean.ravel())
        blob.shape.dim.extend((1,) + mean.shape)
        path.write_bytes(blob.SerializeToString())
    same = np.repeat(x32[:1], 200, axis=0)
    t = transformer(f'crop_size: 20 mirror: true mean_file: "{path}"')
    np.testing.assert_array_equal(t(same, np.random.default_rng(9)), 0)
    centre = transformer(f'crop_size: 20 mean_file: "{path}" scale: 2', "TEST")(x32[1:4], None)
    ref = (x32[1:4].transpose(0, 3, 1, 2) - mean)[:, :, 6:26, 6:26] * 2
    np.testing.assert_allclose(centre, ref, rtol=1e-6)
    with pytest.raises(VggcaffeError, match="mean_file"):
        transformer(f'crop_size: 20 crop_pad: 2 mean_file: "{path}"')(x32[:2], np.random.default_rng(0))


def test_array_and_list_inputs_give_the_same_batch(x32):
    text = "crop_size: 28 mirror: true scale_min: 32 scale_max: 40 color_shift_std: 0.1 " \
           + format_pca(*compute_pca(x32[:100])).replace("\n", " ")
    a = transformer(text)(x32[:64], np.random.default_rng(10))
    b = transformer(text)(list(x32[:64]), np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("as_list", [False, True])
def test_parts_in_threads_and_out_buffers_give_the_same_batch(x32, monkeypatch, tmp_path, as_list):
    """A batch cut into parts (each cropped, flipped, shifted and normalised by a pool thread)
    equals the whole batch done at once; `out` is filled and returned when it fits."""
    from concurrent.futures import ThreadPoolExecutor
    from vggcaffe.data import transforms
    mean = tmp_path / "mean.npy"
    np.save(mean, x32[:100].mean(axis=0).transpose(2, 0, 1))      # (C, H, W)
    text = (f'crop_size: 28 mirror: true color_shift_std: 0.1 mean_file: "{mean}" scale: 0.5 '
            + format_pca(*compute_pca(x32[:100])).replace("\n", " "))
    images = x32[:50] if not as_list else list(x32[:50])
    whole = transformer(text)(images, np.random.default_rng(12))
    monkeypatch.setattr(transforms, "PART_SIZE", 1000)           # 8 parts of 6-7 images
    out = np.full((50, 3, 28, 28), np.nan, np.float32)
    with ThreadPoolExecutor(3) as pool:
        parts = transformer(text)(images, np.random.default_rng(12), map_fn=pool.map, out=out)
    assert parts is out
    np.testing.assert_array_equal(parts, whole)
    for wrong in [np.empty((49, 3, 28, 28), np.float32), np.empty((50, 3, 28, 28), np.float64),
                  np.empty((50, 28, 28, 3), np.float32).transpose(0, 3, 1, 2)]:
        again = transformer(text)(images, np.random.default_rng(12), out=wrong)
        assert again is not wrong
        np.testing.assert_array_equal(again, whole)


def test_images_of_different_sizes_and_the_crop_fit_error():
    images = [load_image(p) for p in photo_paths()[:6]]
    out = transformer("scale_min: 64 crop_size: 56 mirror: true")(images, np.random.default_rng(11))
    assert out.shape == (6, 3, 56, 56)
    with pytest.raises(VggcaffeError, match="crop_size 200 does not fit image b.jpg"):
        transformer("crop_size: 200")([images[1][:250, :250], images[1][:150, :300]], None,
                                      names=["a.jpg", "b.jpg"])
    with pytest.raises(VggcaffeError, match="set crop_size"):
        transformer("")(images[:2], None)


def test_force_gray_matches_pillow_and_force_color_repeats(x32):
    img = load_image(DATA / "photos" / "n02018795_bustard.JPEG")
    np.testing.assert_array_equal(to_gray(img)[:, :, 0], np.asarray(Image.fromarray(img).convert("L")))
    grey = transformer("force_gray: true", "TEST")(x32[:5], None)
    assert grey.shape == (5, 1, 32, 32)
    colour = transformer("force_color: true", "TEST")(grey.astype(np.uint8).transpose(0, 2, 3, 1), None)
    np.testing.assert_array_equal(colour, np.repeat(grey, 3, axis=1))


def test_float_images_rescale_like_uint8(x32):
    t = transformer("scale_min: 48", "TEST")
    a = t(x32[:4], None)
    b = t(x32[:4].astype(np.float32), None)
    assert a.shape == b.shape == (4, 3, 48, 48)
    err = np.abs(a - np.clip(b, 0, 255))        # Pillow's uint8 path rounds and clips between its two passes
    assert err.mean() < 0.5 and err.max() < 8


@pytest.mark.parametrize("text, message", [
    ("scale_min: 300 scale_max: 200", "scale_max"),
    ("scale_max: 200", "scale_max"),
    ('mean_file: "m.npy" mean_value: 1', "not both"),
    ("force_color: true force_gray: true", "exclusive"),
    ("color_shift_std: 0.1", "pca_eigval"),
])
def test_bad_parameters_are_named(text, message):
    with pytest.raises(VggcaffeError, match=message):
        transformer(text)
