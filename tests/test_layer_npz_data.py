"""Tests for the NpzData layer on imagenette_32.npz: forward against a loop reference,
determinism with and without prefetch, epoch wrap, sharding, resume, bad files."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from tests.gradient_check import make_layer
from vggcaffe.blob import Blob
from vggcaffe.errors import VggcaffeError
from vggcaffe.layers import LAYER_TYPES
from vggcaffe.proto import caffe_pb2

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NPZ = DATA / "imagenette_32.npz"
pytestmark = pytest.mark.skipif(not NPZ.exists(),
                                reason=f"real test data not found at {DATA} (shared/data beside the clone)")
AUGMENT = "crop_size: 28 mirror: true scale_min: 32 scale_max: 36 mean_value: 120 scale: 0.01"


@pytest.fixture(scope="module")
def npz():
    with np.load(NPZ, allow_pickle=False) as f:
        return {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def npz_data(params="", transform="", phase="TRAIN", dtype=np.float32, seed=1, source=NPZ, prefetch=3):
    text = (f'name: "data" type: "NpzData" top: "data" top: "label" '
            f'npz_data_param {{ source: "{source}" {params} }} transform_param {{ {transform} }}')
    layer, _, top = make_layer(text, [], phase=phase, dtype=dtype, n_tops=2, seed=seed)
    layer.prefetch = prefetch
    return layer, top


def batches(layer, top, steps, close=True):
    out = []
    try:
        for _ in range(steps):
            layer.forward([], top)
            out.append((top[0].data.copy(), top[1].data.copy()))
    finally:
        if close:
            layer.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (da, la), (db, lb) in zip(a, b):
        np.testing.assert_array_equal(da, db)
        np.testing.assert_array_equal(la, lb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_a_loop_reference(npz, dtype):
    layer, top = npz_data('split: "test" batch_size: 16',
                          "crop_size: 24 mean_value: 125 mean_value: 120 mean_value: 110 scale: 0.5",
                          phase="TEST", dtype=dtype)
    (data, labels), = batches(layer, top, 1)
    x, mean = npz["x_test"], [125, 120, 110]
    ref = np.zeros((16, 3, 24, 24))
    for n in range(16):
        for c in range(3):
            for h in range(24):
                for w in range(24):
                    ref[n, c, h, w] = (float(x[n, 4 + h, 4 + w, c]) - mean[c]) * 0.5
    assert data.dtype == dtype and labels.dtype == dtype
    np.testing.assert_allclose(data, ref, rtol=1e-6)
    np.testing.assert_array_equal(labels, npz["y_test"][:16])


def test_same_seeds_give_the_same_batches_with_and_without_prefetch():
    params = "batch_size: 32 shuffle: true limit: 100"
    with_prefetch = batches(*npz_data(params, AUGMENT, seed=5), 7)
    without = batches(*npz_data(params, AUGMENT, seed=5, prefetch=0), 7)
    assert_same(with_prefetch, without)
    other = batches(*npz_data(params, AUGMENT, seed=6), 1)
    assert not np.array_equal(other[0][0], with_prefetch[0][0])


def test_test_phase_walks_in_order_and_wraps_around(npz):
    out = batches(*npz_data("batch_size: 7 limit: 20", phase="TEST"), 6)
    labels = np.concatenate([lab for _, lab in out])
    np.testing.assert_array_equal(labels, npz["y_train"][np.arange(42) % 20])
    data = np.concatenate([d for d, _ in out])
    np.testing.assert_array_equal(data[20:27], npz["x_train"][:7].transpose(0, 3, 1, 2))


def test_shuffle_is_a_new_permutation_each_epoch(npz):
    out = batches(*npz_data("batch_size: 10 limit: 20 shuffle: true", phase="TEST"), 6)
    epochs = np.concatenate([d for d, _ in out]).reshape(3, 20, -1)
    reference = npz["x_train"][:20].transpose(0, 3, 1, 2).reshape(20, -1)
    orders = []
    for epoch in epochs:
        match = (epoch[:, None, :] == reference[None]).all(axis=2)         # (20, 20)
        assert (match.sum(axis=1) == 1).all() and (match.sum(axis=0) == 1).all()
        orders.append(tuple(match.argmax(axis=1)))
    assert len(set(orders)) == 3 and orders[0] != tuple(range(20))


def test_two_shards_are_disjoint_and_make_up_the_global_batch():
    def run(batch_size, rank, size, seed):                  # 48 samples: no global batch straddles two epochs
        layer, top = npz_data(f"batch_size: {batch_size} limit: 48 shuffle: true", phase="TEST", seed=seed)
        layer.order_seed = [12, 34, 0]                  # as the net sets it: the same on all ranks
        layer.set_shard(rank, size)
        return batches(layer, top, 5)
    whole = run(16, 0, 1, seed=1)
    shard0, shard1 = run(8, 0, 2, seed=2), run(8, 1, 2, seed=3)
    for (g, gl), (a, al), (b, bl) in zip(whole, shard0, shard1):
        np.testing.assert_array_equal(a, g[0::2])
        np.testing.assert_array_equal(b, g[1::2])
        np.testing.assert_array_equal(np.sort(np.concatenate([al, bl])), np.sort(gl))
        flat_a, flat_b = a.reshape(8, -1), b.reshape(8, -1)
        assert not (flat_a[:, None] == flat_b[None]).all(axis=2).any()     # no image in both shards


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_state_draws_the_uninterrupted_batches(prefetch):
    params = "batch_size: 24 shuffle: true limit: 60"
    layer, top = npz_data(params, AUGMENT, seed=7, prefetch=prefetch)
    start = json.loads(json.dumps(layer.state()))
    first = batches(layer, top, 4, close=False)
    middle = json.loads(json.dumps(layer.state()))
    assert middle["epoch"] == 1 and middle["position"] == 36
    rest = batches(layer, top, 4, close=False)
    layer.set_state(start)                                              # rewind the same layer
    assert_same(batches(layer, top, 8), first + rest)
    fresh, fresh_top = npz_data(params, AUGMENT, seed=99, prefetch=3)   # a new process, other seed
    fresh.set_state(middle)
    assert_same(batches(fresh, fresh_top, 4), rest)


def test_an_order_seed_set_before_setup_is_kept():
    param = text_format.Parse(f'name: "data" type: "NpzData" npz_data_param {{ source: "{NPZ}" limit: 10 }}',
                              caffe_pb2.LayerParameter())
    layer = LAYER_TYPES["NpzData"](param, phase="TRAIN", rng=np.random.default_rng(1))
    layer.order_seed = [5, 6, 2]
    layer.setup([], [Blob(()), Blob(())])
    assert json.loads(json.dumps(layer.state()))["order_seed"] == [5, 6, 2]


def test_producer_errors_are_raised_in_forward_and_close_stops_the_thread():
    layer, top = npz_data("batch_size: 4", "crop_size: 40")
    with pytest.raises(VggcaffeError, match="crop_size 40 does not fit image .*x_train.*\\[0\\]"):
        layer.forward([], top)
    with pytest.raises(VggcaffeError, match="does not fit"):
        layer.forward([], top)
    layer.close()
    layer, top = npz_data("batch_size: 4")
    batches(layer, top, 2, close=False)
    assert any(t.name == "vggcaffe-prefetch" for t in threading.enumerate())
    layer.close()
    assert not any(t.name == "vggcaffe-prefetch" for t in threading.enumerate())


def test_bad_npz_files_are_named(tmp_path):
    with pytest.raises(VggcaffeError, match="no 'x_val'.*available keys: class_names, source"):
        npz_data('split: "val"')
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1, int))
    with pytest.raises(VggcaffeError, match="objects.npz"):
        npz_data(source=tmp_path / "objects.npz")
    np.savez(tmp_path / "floats.npz", x_train=np.zeros((2, 8, 8, 3)), y_train=np.zeros(2, int))
    with pytest.raises(VggcaffeError, match="expected uint8"):
        npz_data(source=tmp_path / "floats.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(VggcaffeError, match="not an .npz"):
        npz_data(source=tmp_path / "plain.npy")
    with pytest.raises(VggcaffeError, match="missing.npz"):
        npz_data(source=tmp_path / "missing.npz")


def test_set_shard_and_set_state_reject_bad_values():
    layer, _ = npz_data("batch_size: 4 limit: 10")
    with pytest.raises(VggcaffeError, match="rank 2"):
        layer.set_shard(2, 2)
    with pytest.raises(VggcaffeError, match="lacks"):
        layer.set_state({"epoch": 0})
    with pytest.raises(VggcaffeError, match="position 10"):
        layer.set_state(dict(layer.state(), position=10))


def test_an_empty_split_or_file_is_an_error_not_a_hang(tmp_path):
    from vggcaffe.data.sources import BatchOrder, NpzSource
    np.savez(tmp_path / "empty.npz", x_test=np.zeros((0, 4, 4, 3), np.uint8), y_test=np.zeros(0, np.int64))
    with pytest.raises(VggcaffeError, match=r"empty.npz\[x_test\] holds no images"):
        NpzSource(str(tmp_path / "empty.npz"), "test", 0, "data")
    (tmp_path / "zero.npz").write_bytes(b"")
    with pytest.raises(VggcaffeError, match="layer 'data': cannot read npz source"):
        NpzSource(str(tmp_path / "zero.npz"), "test", 0, "data")
    with pytest.raises(VggcaffeError, match="no samples"):
        BatchOrder(0, 4, True, 1)
