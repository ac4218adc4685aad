"""Caffe's LMDB databases (convert_imageset, compute_image_mean, Datum decoding: raw BGR, encoded,
float) and the Data layer against ImageData on the same images; DummyData and MemoryData."""
import lmdb
import numpy as np
import pytest
from PIL import Image

from tests.gradient_check import make_layer
from vggcaffe.cli import main
from vggcaffe.data.db import LmdbSource, datum_to_image
from vggcaffe.errors import VggcaffeError
from vggcaffe.proto import caffe_pb2

COUNT, H, W = 5, 12, 10           # images of one size, so a batch stacks and a mean image exists


@pytest.fixture
def images(tmp_path):
    """(root, listing, [RGB arrays], labels): COUNT random RGB PNGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    arrays, lines = [], []
    for i in range(COUNT):
        a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / f"im{i}.png")
        arrays.append(a)
        lines.append(f"im{i}.png {i % 3}")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return root, listing, arrays, [i % 3 for i in range(COUNT)]


def convert(tmp_path, images, name, *flags):
    root, listing, _, _ = images
    assert main(["convert_imageset", f"{root}/", str(listing), str(tmp_path / name), *flags]) == 0
    return tmp_path / name


def records(db):
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = []
        for key, value in txn.cursor():
            d = caffe_pb2.Datum()
            d.ParseFromString(value)
            out.append((key.decode(), d))
    env.close()
    return out


def data_layer(db, batch_size=5, transform="", extra=""):
    text = (f'name: "data" type: "Data" top: "data" top: "label" '
            f'data_param {{ source: "{db}" batch_size: {batch_size} backend: LMDB {extra} }} '
            f'transform_param {{ {transform} }}')
    layer, _, top = make_layer(text, [], phase="TEST", n_tops=2)
    return layer, top


def test_convert_imageset_writes_caffes_keys_and_bgr_chw_datums(tmp_path, images):
    _, _, arrays, labels = images
    rows = records(convert(tmp_path, images, "db"))
    assert [key for key, _ in rows] == [f"{i:08d}_im{i}.png" for i in range(5)]      # Caffe's key format
    for (_, d), a, label in zip(rows, arrays, labels):
        assert (d.channels, d.height, d.width, d.label, d.encoded) == (3, 12, 10, label, False)
        chw = np.frombuffer(d.data, np.uint8).reshape(3, 12, 10)
        np.testing.assert_array_equal(chw, a[:, :, ::-1].transpose(2, 0, 1))          # B, G, R planes


def test_the_data_layer_reads_what_imagedata_reads(tmp_path, images):
    root, listing, arrays, labels = images
    for flags in ([], ["--encoded", "--encode_type", "png"]):
        db = convert(tmp_path, images, f"db{len(flags)}", *flags)
        layer, top = data_layer(db)
        layer.forward([], top)
        layer.close()
        np.testing.assert_array_equal(top[0].data, np.stack(arrays).transpose(0, 3, 1, 2))   # RGB, as ImageData
        np.testing.assert_array_equal(top[1].data, labels)
        text = (f'name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{listing}" '
                f'root_folder: "{root}/" batch_size: 5 }}')
        image_data, _, image_top = make_layer(text, [], phase="TEST", n_tops=2)
        image_data.forward([], image_top)
        image_data.close()
        np.testing.assert_array_equal(top[0].data, image_top[0].data)


def test_shuffle_resize_and_rand_skip(tmp_path, images):
    _, _, arrays, labels = images
    db = convert(tmp_path, images, "db", "--shuffle", "--resize_height", "6", "--resize_width", "8")
    rows = records(db)
    order = [int(key.split("_im")[1].split(".")[0]) for key, _ in rows]
    assert sorted(order) == list(range(5)) and order != list(range(5))
    assert all((d.height, d.width) == (6, 8) for _, d in rows)
    layer, top = data_layer(db, batch_size=2, extra="rand_skip: 4")
    skip = layer.state()["position"]
    layer.forward([], top)
    layer.close()
    assert 0 <= skip < 4
    np.testing.assert_array_equal(top[1].data, [labels[order[(skip + k) % 5]] for k in range(2)])


def test_compute_image_mean_is_the_rgb_mean_and_feeds_mean_file(tmp_path, images):
    _, _, arrays, _ = images
    db = convert(tmp_path, images, "db")
    assert main(["compute_image_mean", str(db), str(tmp_path / "mean.binaryproto")]) == 0
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString((tmp_path / "mean.binaryproto").read_bytes())
    expected = np.mean(np.stack(arrays).astype(np.float64), axis=0).transpose(2, 0, 1)
    np.testing.assert_allclose(np.array(blob.data).reshape(3, 12, 10), expected, rtol=1e-6)
    layer, top = data_layer(db, transform=f'mean_file: "{tmp_path / "mean.binaryproto"}"')
    layer.forward([], top)
    layer.close()
    np.testing.assert_allclose(top[0].data, np.stack(arrays).transpose(0, 3, 1, 2) - expected.astype(np.float32),
                               atol=1e-4)


def test_datums_written_by_caffe_read_as_rgb_and_float_data_as_is():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)         # RGB (H, W, C)
    d = caffe_pb2.Datum(channels=3, height=2, width=3, data=image[:, :, ::-1].transpose(2, 0, 1).tobytes())
    np.testing.assert_array_equal(datum_to_image(d), image)
    f = caffe_pb2.Datum(channels=1, height=2, width=2, float_data=[0.5, -1, 2, 3])
    np.testing.assert_array_equal(datum_to_image(f)[:, :, 0], [[0.5, -1], [2, 3]])
    with pytest.raises(VggcaffeError, match="holds 4 values for channels x height x width 1 x 2 x 3"):
        datum_to_image(caffe_pb2.Datum(channels=1, height=2, width=3, data=bytes(4)), where="rec")


def test_databases_that_cannot_be_read_are_one_line_errors(tmp_path):
    (tmp_path / "leveldb").mkdir()
    (tmp_path / "leveldb" / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(VggcaffeError, match="is a LevelDB database, which vggcaffe does not read"):
        LmdbSource(tmp_path / "leveldb", True, "data")
    with pytest.raises(VggcaffeError, match="is not an LMDB database"):
        LmdbSource(tmp_path, True, "data")
    lmdb.open(str(tmp_path / "empty")).close()
    with pytest.raises(VggcaffeError, match="holds no records"):
        LmdbSource(tmp_path / "empty", True, "data")
    with pytest.raises(VggcaffeError, match=r"\(Data\): data_param.source is not set"):
        make_layer('name: "d" type: "Data" top: "data" data_param { batch_size: 1 }', [], n_tops=1)


def test_dense_testing_reads_an_lmdb_source(tmp_path, images):
    from vggcaffe.evaluate import ImageSet
    _, _, arrays, labels = images
    db = convert(tmp_path, images, "db")
    chunks = list(ImageSet(db).chunks(3))
    assert [list(i) for i, _ in chunks] == [[0, 1, 2], [3, 4]]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), np.stack(arrays))
    np.testing.assert_array_equal(ImageSet(db).labels, labels)


def test_dummy_data_fills_constant_tops_once_and_random_ones_every_forward():
    text = ('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
            'shape { dim: 2 dim: 3 } shape { dim: 4 } '
            'data_filler { type: "constant" value: 7 } data_filler { type: "gaussian" std: 2 } }')
    layer, _, top = make_layer(text, [], n_tops=2, seed=3)
    first = top[1].data.copy()
    layer.forward([], top)
    assert top[0].shape == (2, 3) and (top[0].data == 7).all()
    assert top[1].shape == (4,) and not np.array_equal(first, top[1].data)
    legacy = 'name: "d" type: "DummyData" top: "a" dummy_data_param { num: 2 channels: 1 height: 3 width: 4 }'
    _, _, top = make_layer(legacy, [], n_tops=1)
    assert top[0].shape == (2, 1, 3, 4) and not top[0].data.any()
    _, _, top = make_layer('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 2 } }',
                           [], n_tops=2)
    assert top[0].shape == top[1].shape == (2,)                      # one shape serves every top, as in Caffe
    with pytest.raises(VggcaffeError, match=r"\(DummyData\) gives 2 shapes for 3 tops"):
        make_layer('name: "d" type: "DummyData" top: "a" top: "b" top: "c" '
                   'dummy_data_param { shape { dim: 1 } shape { dim: 1 } }', [], n_tops=3)


def test_memory_data_serves_the_arrays_set_on_the_net_in_batches():
    from vggcaffe.net import Net
    from vggcaffe.prototxt import parse_text
    text = ('layer { name: "mem" type: "MemoryData" top: "data" top: "label" '
            'memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }')
    net = Net(parse_text(text, caffe_pb2.NetParameter()))
    with pytest.raises(VggcaffeError, match="call net.set_input_arrays first"):
        net.forward()
    data = np.arange(4 * 4, dtype=np.float32).reshape(4, 1, 2, 2)
    net.set_input_arrays(data, np.array([0, 1, 2, 3], np.float32).reshape(4, 1, 1, 1))   # pycaffe's label shape
    for start in (0, 2, 0):                                            # wraps around
        out = net.forward()
        np.testing.assert_array_equal(out["data"], data[start:start + 2])
        np.testing.assert_array_equal(out["label"], [start, start + 1])
    with pytest.raises(VggcaffeError, match="3 samples is not a positive multiple of batch_size 2"):
        net.set_input_arrays(data[:3], np.zeros(3))
    with pytest.raises(VggcaffeError, match=r"the layer takes \(N, 1, 2, 2\)"):
        net.set_input_arrays(np.zeros((2, 3, 2, 2)), np.zeros(2))


def test_encoded_keeps_file_bytes_grey_stays_grey_and_bad_images_are_skipped(tmp_path, images, capsys):
    root, listing, arrays, _ = images
    rows = records(convert(tmp_path, images, "same", "--encoded"))            # no resize: the PNG files' bytes
    assert all(d.encoded and d.data == (root / key.split("_", 1)[1]).read_bytes() for key, d in rows)
    grey = records(convert(tmp_path, images, "grey", "--encoded", "--gray"))
    assert datum_to_image(grey[0][1]).shape == (H, W, 1)                      # Caffe decodes natively
    assert datum_to_image(grey[0][1], color=True).shape == (H, W, 3)
    listing.write_text(listing.read_text().replace("im2.png", "missing.png"))
    rows = records(convert(tmp_path, images, "skip"))
    assert [key[:8] for key, _ in rows] == ["00000000", "00000001", "00000003", "00000004"]   # Caffe's line ids
    assert "Warning: skipped: image file not found" in capsys.readouterr().err


def test_a_database_made_anew_at_a_path_is_read_anew(tmp_path, images):
    import shutil
    db = convert(tmp_path, images, "db")
    assert len(LmdbSource(db, None, "d")) == 5
    shutil.rmtree(db)
    images[1].write_text("im0.png 0\nim1.png 1\n")
    convert(tmp_path, images, "db")
    assert len(LmdbSource(db, None, "d")) == 2
