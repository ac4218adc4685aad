"""Shared activation diffs (vggcaffe.memory.share_diffs) on NumPy: a net whose diffs share
memory computes the gradients of the same net with a diff array per blob, exactly."""
from pathlib import Path

import numpy as np
import pytest

from vggcaffe import cpu
from vggcaffe.blob import is_channels_last
from vggcaffe.errors import VggcaffeError
from vggcaffe.memory import share_data, share_diffs
from vggcaffe.net import Net
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text
from vggcaffe.timing import fill_inputs, synthetic_net

MODELS = Path(__file__).resolve().parent.parent / "models"

BRANCHED = """
force_backward: true
layer { name: "x" type: "Input" top: "x" top: "ta" top: "tb"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 dim: 5 } shape { dim: 4 dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "x" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv_a" type: "Convolution" bottom: "pool1" top: "conv_a"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "conv_b" type: "Convolution" bottom: "pool1" top: "conv_b"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "relu_b" type: "ReLU" bottom: "conv_b" top: "conv_b" }
layer { name: "fc_a" type: "InnerProduct" bottom: "conv_a" top: "fc_a"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc_b" type: "InnerProduct" bottom: "conv_b" top: "fc_b"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss_a" type: "EuclideanLoss" bottom: "fc_a" bottom: "ta" top: "loss_a" }
layer { name: "loss_b" type: "EuclideanLoss" bottom: "fc_b" bottom: "tb" top: "loss_b" }
"""


def small_a():
    return synthetic_net(str(MODELS / "small" / "A_train_val.prototxt"), batch=2)


def branched():
    return parse_text(BRANCHED, caffe_pb2.NetParameter())


def step(param, share, prepare):
    net = Net(param, phase="TRAIN", seed=5)
    if prepare:
        cpu.prepare_net(net)
    if share:
        share_diffs(net)
    fill_inputs(net, seed=2)
    net.clear_param_diffs()
    loss = net.forward_backward()
    grads = [b.diff.copy() for b in net.learnable_params]
    inputs = {name: net.blobs[name].diff.copy() for name in net.inputs}
    return net, loss, grads, inputs


@pytest.mark.parametrize("make", [small_a, branched], ids=["small-A", "branched"])
@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "cpu-prepared"])
def test_shared_diffs_give_the_same_gradients(make, prepare):
    net, loss, grads, inputs = step(make(), True, prepare)
    _, ref_loss, ref_grads, ref_inputs = step(make(), False, prepare)
    assert loss == ref_loss
    for g, r in zip(grads, ref_grads):
        np.testing.assert_array_equal(g, r)
    for name in inputs:
        np.testing.assert_array_equal(inputs[name], ref_inputs[name])
    assert net.shared_diff_bytes > 0
    if make is small_a:                  # a chain: two slots instead of a diff per blob
        activations = sum(b.data.nbytes for name, b in net.blobs.items() if name not in net.inputs)
        assert net.shared_diff_bytes < activations / 2


def test_blobs_sharing_memory_have_disjoint_backward_spans():
    net = Net(branched(), phase="TRAIN", seed=5)
    share_diffs(net)
    span = {}
    for i, (bottom, top) in enumerate(zip(net._bottoms, net._tops)):
        for b in bottom:
            if id(b) in span:
                span[id(b)][1] = i
        for t in top:
            span.setdefault(id(t), [i, i])
    blobs = {id(b): b for tops in net._tops for b in tops}
    by_memory = {}
    for key, blob in blobs.items():
        base = blob.diff.base if blob.diff.base is not None else blob.diff
        by_memory.setdefault(id(base), []).append(key)
    shared = [keys for keys in by_memory.values() if len(keys) > 1]
    assert shared, "nothing shared"
    for keys in shared:
        spans = sorted(span[k] for k in keys)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans


def test_test_nets_and_outputs_keep_their_own_diffs():
    net = Net(small_a(), phase="TEST", seed=5)
    share_diffs(net)
    assert net.shared_diff_bytes == 0 and not any(b.has_diff for b in net.blobs.values())
    train = Net(branched(), phase="TRAIN", seed=5)
    share_diffs(train)
    for name in list(train.inputs) + list(train.outputs):
        assert train.blobs[name].diff.base is None


# ---------------------------------------------------------------- shared data in forward-only nets
FULLY_CONV = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "x" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv_a" type: "Convolution" bottom: "conv2" top: "conv_a"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "conv_b" type: "Convolution" bottom: "conv2" top: "conv_b"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "pool_b" type: "Pooling" bottom: "conv_b" top: "pool_b" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
"""


def forward(param, share, prepare, sizes, keep=()):
    """Outputs (and kept blobs) of a TEST net fed random inputs of each (H, W) in turn."""
    net = Net(param, phase="TEST", seed=5)
    if prepare:
        cpu.prepare_net(net)
    if share:
        share_data(net, keep=keep)
    results = []
    for k, (h, w) in enumerate(sizes):
        if net.inputs == ["x"]:
            x = net.blobs["x"]
            x.reshape(x.shape[0], x.shape[1], h, w)
        fill_inputs(net, seed=k)
        net.forward_loss()
        results.append({name: net.blobs[name].data.copy() for name in list(net.outputs) + list(keep)})
    return net, results


@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "cpu-prepared"])
def test_shared_data_gives_the_outputs_of_the_plain_net(prepare):
    """A chain (small A, TEST) and a branched fully-convolutional net whose input changes
    size between passes (slots grow and shrink back): outputs and kept blobs are those of
    the same net with an array per blob, bit for bit."""
    cases = [(small_a(), [(32, 32)], ("conv3_1",), 0.5),
             (parse_text(FULLY_CONV, caffe_pb2.NetParameter()), [(12, 12), (20, 16), (8, 8), (20, 16)], ("pool1",),
              0.7)]
    for param, sizes, keep, fraction in cases:
        net, shared = forward(param, True, prepare, sizes, keep)
        plain_net, plain = forward(param, False, prepare, sizes, keep)
        for got, want in zip(shared, plain):
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        activations = sum(b.data.nbytes for name, b in plain_net.blobs.items() if name not in plain_net.inputs)
        assert 0 < net.data_slots.nbytes < fraction * activations
        for name in keep:
            assert id(net.blobs[name]) not in net.data_slots.slot_of


def test_blobs_sharing_data_have_disjoint_forward_spans():
    """Blobs in one slot are live (producer's forward to last consumer's, a Split's tops
    counting as their bottom) at disjoint times."""
    net = Net(parse_text(FULLY_CONV, caffe_pb2.NetParameter()), phase="TEST", seed=5)
    share_data(net)
    root, span = {}, {}
    for i, (layer, bottom, top) in enumerate(zip(net.layers, net._bottoms, net._tops)):
        for b in bottom:
            key = root.get(id(b), id(b))
            if key in span:
                span[key][1] = i
        for t in top:
            if layer.type == "Split":
                root[id(t)] = root.get(id(bottom[0]), id(bottom[0]))
            else:
                span.setdefault(id(t), [i, i])
    by_slot = {}
    for key, slot in net.data_slots.slot_of.items():
        by_slot.setdefault(slot, []).append(key)
    assert any(len(keys) > 1 for keys in by_slot.values()), "nothing shared"
    for keys in by_slot.values():
        spans = sorted(span[k] for k in keys)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans


def test_shared_data_nets_refuse_backward_partial_runs_and_unknown_blobs():
    """Backward, a forward from a later layer, and asking for an intermediate blob that a
    later layer overwrites are refused with a message; forward up to a layer returns its top."""
    net = share_data(Net(branched(), phase="TRAIN", seed=5))
    fill_inputs(net)
    net.forward_loss()
    with pytest.raises(VggcaffeError, match="runs forward only: its activations share memory"):
        net.backward()
    with pytest.raises(VggcaffeError, match="forward must start at the first layer, not 'conv_a'"):
        net.forward(start="conv_a")
    with pytest.raises(VggcaffeError, match=r"blob\(s\) conv1 are overwritten by later layers"):
        net.forward(blobs=["conv1"])
    assert net.forward(end="pool1")["pool1"].shape == (4, 6, 4, 4)
    with pytest.raises(VggcaffeError, match="has no blob 'conv9'"):
        share_data(Net(branched(), phase="TEST", seed=5), keep=["conv9"])


def test_building_a_net_allocates_no_activations():
    """As in Caffe, a blob's memory comes at its first use: a built (and CPU-prepared) net
    holds its parameters only; a forward allocates the activations, in the recorded
    layouts; share_data's slots then hold less than the plain net's activations."""
    import tracemalloc
    param = synthetic_net(str(MODELS / "small" / "A_train_val.prototxt"), batch=64)
    tracemalloc.start()
    try:
        net = Net(param, phase="TEST", seed=5)
        built = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    params = sum(b.data.nbytes for b in net.learnable_params)
    assert not any(b.has_data for b in net.blobs.values())
    assert built < params + (1 << 20)
    cpu.prepare_net(net)                                  # records channels-last layouts, allocates nothing
    assert not any(b.has_data for b in net.blobs.values())
    assert any(b.channels_last for b in net.blobs.values())
    fill_inputs(net)
    net.forward_loss()
    assert all(b.has_data for b in net.blobs.values())
    assert all(is_channels_last(b.data) for b in net.blobs.values() if b.channels_last)
    shared = share_data(Net(param, phase="TEST", seed=5))
    fill_inputs(shared)
    shared.forward_loss()
    activations = sum(b.data.nbytes for name, b in net.blobs.items() if name not in net.inputs)
    assert shared.data_slots.nbytes < activations / 2
