"""vggcaffe.cpu.prepare_net: folded ReLUs and channels-last blobs compute what the plain net does."""
from pathlib import Path

import numpy as np
import pytest

from vggcaffe import cpu
from vggcaffe.blob import is_channels_last
from vggcaffe.layers.relu import FusedReLU
from vggcaffe.net import Net
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text


def conv(name, bottom, n, extra="kernel_size: 3 pad: 1", relu=True):
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} {extra} weight_filler {{ type: "xavier" }} '
            f'bias_filler {{ type: "gaussian" std: 0.1 }} }} }}\n')
    if relu:
        text += f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def pool(name, bottom):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n')


# Every kind of convolution the CPU runs: NCHW flat (3 channels) writing channels-last,
# NHWC with the transposed-conv data gradient (16x16, 8x8), NHWC with col2im (stride 2,
# 2x2 maps), a 1x1 (NCHW only, so its bottom stays NCHW), a conv without a ReLU after it,
# dropout and inner product at the end.
NET = (
    'force_backward: true\n'
    'layer { name: "data" type: "Input" top: "data" top: "label" '
    'input_param { shape { dim: 4 dim: 3 dim: 32 dim: 32 } shape { dim: 4 } } }\n'
    + conv("conv1", "data", 8) + pool("pool1", "conv1")
    + conv("conv2", "pool1", 32) + pool("pool2", "conv2")
    + conv("conv3", "pool2", 32) + conv("conv4", "conv3", 32, "kernel_size: 3 pad: 1 stride: 2")
    + conv("conv5", "conv4", 32) + conv("conv6", "conv5", 16, "kernel_size: 1", relu=False)
    + pool("pool6", "conv6")
    + 'layer { name: "drop" type: "Dropout" bottom: "pool6" top: "pool6" dropout_param { dropout_ratio: 0.3 } }\n'
    'layer { name: "fc" type: "InnerProduct" bottom: "pool6" top: "fc" '
    'inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }\n'
    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }\n'
)


def build(batch=4):
    param = parse_text(NET.replace("dim: 4 dim: 3", f"dim: {batch} dim: 3").replace("shape { dim: 4 }",
                                                                                    f"shape {{ dim: {batch} }}"),
                       caffe_pb2.NetParameter())
    return Net(param, phase="TRAIN", dtype=np.float64, seed=11)


def run(net, seed=0):
    rs = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rs.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rs.integers(0, 5, net.blobs["label"].shape)
    for layer in net.layers:
        if layer.type == "Dropout":
            layer.rng = np.random.default_rng(seed)
    net.clear_param_diffs()
    loss = net.forward_backward()
    return loss, {name: (b.data.copy(), b.diff.copy()) for name, b in net.blobs.items()}, \
        [p.diff.copy() for p in net.learnable_params]


@pytest.mark.parametrize("batch", [4, 3])
def test_prepared_net_computes_what_the_plain_net_does(batch):
    plain, prepared = build(batch), cpu.prepare_net(build(batch))
    for seed in (0, 1):                     # twice: buffers kept across iterations stay right
        loss, blobs, grads = run(plain, seed)
        loss_p, blobs_p, grads_p = run(prepared, seed)
        assert loss_p == pytest.approx(loss, rel=1e-12)
        for name, (data, diff) in blobs.items():
            np.testing.assert_allclose(blobs_p[name][0], data, rtol=1e-10, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(blobs_p[name][1], diff, rtol=1e-10, atol=1e-12, err_msg=name)
        for g, g_p in zip(grads, grads_p):
            np.testing.assert_allclose(g_p, g, rtol=1e-10, atol=1e-12)


def test_what_prepare_net_changes():
    net = cpu.prepare_net(build())
    fused = {layer.name for layer in net.layers if isinstance(layer, FusedReLU)}
    assert fused == {f"relu_conv{i}" for i in range(1, 6)}
    assert all(net.layer_dict[f"conv{i}"].fused_relu for i in range(1, 6))
    assert not net.layer_dict["conv6"].fused_relu
    # The MAX pool after conv1 and conv2 (their only consumer) does their ReLU's backward.
    assert [name for name in ("conv1", "conv2", "conv3", "conv5") if net.layer_dict[name].relu_grad_in_pool] == \
        ["conv1", "conv2"]
    assert net.layer_dict["pool1"].relu_mask and net.layer_dict["pool2"].relu_mask
    assert not net.layer_dict["pool6"].relu_mask
    last = {name: is_channels_last(net.blobs[name].data) for name in net.blobs if net.blobs[name].data.ndim == 4}
    # NCHW-only consumers: conv2 (8 channels) of pool1, the 1x1 conv6 of conv5, InnerProduct of pool6.
    assert last == {"data": False, "conv1": True, "pool1": False, "conv2": True, "pool2": True, "conv3": True,
                    "conv4": True, "conv5": False, "conv6": False, "pool6": False}


def test_reshape_after_prepare_keeps_channels_last():
    net = cpu.prepare_net(build(4))
    net.blobs["data"].reshape(2, 3, 32, 32)
    net.blobs["label"].reshape(2)
    net.reshape()
    assert net.blobs["conv2"].shape == (2, 32, 16, 16) and is_channels_last(net.blobs["conv2"].data)
    plain = build(4)
    plain.blobs["data"].reshape(2, 3, 32, 32)
    plain.blobs["label"].reshape(2)
    plain.reshape()
    assert run(net)[0] == pytest.approx(run(plain)[0], rel=1e-12)


def test_solver_prepares_its_cpu_nets(monkeypatch):
    from vggcaffe.solver import SGDSolver
    monkeypatch.chdir(Path(__file__).resolve().parents[1])        # the demo's paths are relative to the root
    solver = SGDSolver("models/demo_solver.prototxt")
    for net in [solver.net] + solver.test_nets:
        assert isinstance(net.layer_dict["relu1_1"], FusedReLU)
        assert is_channels_last(net.blobs["conv3_1"].data)
