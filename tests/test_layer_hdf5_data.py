"""HDF5Data: rows of the files' datasets in order and wrapping, shuffled passes, shards, resume, errors."""
import h5py
import numpy as np
import pytest

from tests.gradient_check import make_layer
from vggcaffe.errors import VggcaffeError


@pytest.fixture
def files(tmp_path):
    """Two files of 3 and 4 rows: data (N, 2, 2) = row number, label (N,) = 10 + row number."""
    paths = []
    start = 0
    for i, n in enumerate((3, 4)):
        path = tmp_path / f"part{i}.h5"
        rows = np.arange(start, start + n)
        with h5py.File(path, "w") as f:
            f["data"] = np.repeat(rows, 4).reshape(n, 2, 2).astype(np.float32)
            f["label"] = 10 + rows
        paths.append(str(path))
        start += n
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def layer(listing, batch=2, shuffle=False):
    text = (f'name: "h5" type: "HDF5Data" top: "data" top: "label" '
            f'hdf5_data_param {{ source: "{listing}" batch_size: {batch} shuffle: {str(shuffle).lower()} }}')
    return make_layer(text, [], n_tops=2)


def rows(lay, top, steps):
    out = []
    for _ in range(steps):
        lay.forward([], top)
        assert np.array_equal(top[1].data, top[0].data[:, 0, 0] + 10)
        out.extend(top[0].data[:, 0, 0].astype(int).tolist())
    return out


def test_batches_run_through_the_files_and_wrap(files):
    lay, _, top = layer(files, batch=3)
    assert top[0].shape == (3, 2, 2) and top[1].shape == (3,)
    assert rows(lay, top, 3) == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_shuffle_permutes_files_and_rows_each_pass_and_resumes(files):
    lay, _, top = layer(files, batch=7, shuffle=True)
    first, second = rows(lay, top, 1), rows(lay, top, 1)
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert {tuple(sorted(first[:3])), tuple(sorted(first[:4]))} & {(0, 1, 2), (3, 4, 5, 6)}   # files stay whole
    lay2, _, top2 = layer(files, batch=3, shuffle=True)
    lay3, _, top3 = layer(files, batch=3, shuffle=True)
    rows(lay2, top2, 2)
    lay3.set_state(lay2.state())
    assert rows(lay2, top2, 3) == rows(lay3, top3, 3)


def test_two_shards_split_each_global_batch(files):
    whole, _, top = layer(files, batch=4)
    expected = rows(whole, top, 2)
    got = []
    for rank in (0, 1):
        lay, _, t = layer(files, batch=2)
        lay.set_shard(rank, 2)
        got.append(rows(lay, t, 2))
    assert got[0] == expected[0:4:2] + expected[4:8:2] and got[1] == expected[1:4:2] + expected[5:8:2]


def test_missing_datasets_files_and_lists_are_one_line_errors(tmp_path, files):
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["data"] = np.zeros((2, 3))
    (tmp_path / "bad.txt").write_text(str(tmp_path / "bad.h5"))
    with pytest.raises(VggcaffeError, match=r"bad.h5 has no dataset 'label'; it holds data"):
        layer(tmp_path / "bad.txt")
    (tmp_path / "gone.txt").write_text(str(tmp_path / "nowhere.h5"))
    with pytest.raises(VggcaffeError, match="cannot read HDF5 file .*nowhere.h5"):
        layer(tmp_path / "gone.txt")
    with pytest.raises(VggcaffeError, match="cannot read the file list"):
        layer(tmp_path / "no_list.txt")


def test_a_net_trains_from_hdf5_rows(files):
    from vggcaffe.net import Net
    from vggcaffe.proto import caffe_pb2
    from vggcaffe.prototxt import parse_text
    text = (f'layer {{ name: "h5" type: "HDF5Data" top: "data" top: "label" '
            f'hdf5_data_param {{ source: "{files}" batch_size: 2 shuffle: true }} }}\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 1 } }\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "label" top: "loss" }')
    nets = [Net(parse_text(text, caffe_pb2.NetParameter()), "TRAIN", seed=4) for _ in range(2)]
    batches = [[n.forward()["loss"].item() for _ in range(5)] for n in nets]
    assert batches[0] == batches[1]                     # the net's seed fixes the shuffled order
