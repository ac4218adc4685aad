"""Net surgery: deploy nets from train_val nets, and the FC->conv conversion of dense testing.

Section 3.2 of the paper: "the fully-connected layers are first converted to
convolutional layers (the first FC layer to a 7x7 conv. layer, the last two FC
layers to 1x1 conv. layers)", so the net applies to a whole uncropped image and
yields a class score map. `fully_convolutional` does that to any deploy net:
each InnerProduct becomes a Convolution of the same name whose kernel is the
spatial size of its bottom (pool5: 7x7 at 224 px, 1x1 for the 32 px nets), and
its weight (num_output, C*H*W), in C.H.W order, is reshaped to
(num_output, C, H, W); Flatten layers feeding an InnerProduct are removed.
Softmax keeps axis 1, so "prob" becomes a map of posteriors over channels.
The converted net keeps the Input shape of the deploy net; Net.forward with a
larger input (any side >= the crop size) reshapes every layer.

`deploy_from_train_val` turns a train_val net into the deploy net it trains:
the TEST data layer becomes an Input of crop size, layers reading the label
(loss, accuracy) are dropped and a Softmax "prob" reads the scores. The Input
keeps how its images are prepared in its transform_param (a field every
LayerParameter has, which Input layers ignore): the TEST layer's mean, scale
and crop_size, with scale_min/scale_max set to the TRAIN layer's range of S,
from which vggcaffe/evaluate.py derives the paper's test scales Q.
"""
import numpy as np

from .errors import VggcaffeError
from .graph import filter_net
from .net import Net
from .proto import caffe_pb2
from .prototxt import read_net, upgrade_net
from .weights import read_weights

DATA_TYPES = {"Data", "ImageData", "NpzData", "HDF5Data", "MemoryData", "WindowData", "DummyData"}


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def is_data_layer(layer):
    """A data layer: one of Caffe's, or a Python layer without bottoms."""
    return layer.type in DATA_TYPES or (layer.type == "Python" and not layer.bottom)


def test_data_layer(net_param):
    """The data layer of the TEST phase (its transform_param is the test transform)."""
    test = filter_net(upgrade_net(_copy(net_param)), caffe_pb2.NetState(phase=caffe_pb2.TEST))
    return next((layer for layer in test.layer if is_data_layer(layer)), None)


def train_data_layer(net_param):
    train = filter_net(upgrade_net(_copy(net_param)), caffe_pb2.NetState(phase=caffe_pb2.TRAIN))
    return next((layer for layer in train.layer if is_data_layer(layer)), None)


def is_deploy(net_param):
    return any(layer.type == "Input" for layer in upgrade_net(_copy(net_param)).layer)


def deploy_from_train_val(net_param, batch=1, prob=True):
    """The TEST net of `net_param` with an Input (batch, C, crop, crop) in place of its data layer,
    without the layers that read the label, ending in a Softmax "prob" (unless prob is False:
    a box regressor's outputs are not class scores)."""
    test = filter_net(upgrade_net(_copy(net_param)), caffe_pb2.NetState(phase=caffe_pb2.TEST))
    data = test_data_layer(net_param)
    if data is None:
        raise VggcaffeError(f"net '{net_param.name}' has no data layer in the TEST phase")
    t = data.transform_param
    if not t.crop_size:
        raise VggcaffeError(f"data layer '{data.name}' has no crop_size: the input size of the deploy net is unknown")
    channels = 1 if t.force_gray else 3
    out = _copy(test)
    out.ClearField("layer")
    data_input = out.layer.add(name=data.top[0], type="Input", top=[data.top[0]])
    data_input.input_param.shape.add(dim=[batch, channels, t.crop_size, t.crop_size])
    data_input.transform_param.CopyFrom(t)
    train = train_data_layer(net_param)
    if train is not None:
        data_input.transform_param.scale_min = train.transform_param.scale_min
        data_input.transform_param.scale_max = train.transform_param.scale_max
    dropped, scores = set(data.top[1:]), None
    for layer in test.layer:
        if layer.name == data.name:
            continue
        if dropped & set(layer.bottom):
            dropped.update(layer.top)
            if layer.type == "SoftmaxWithLoss" and scores is None:
                scores = layer.bottom[0]
            continue
        out.layer.add().CopyFrom(layer)
    if prob:
        out.layer.add(name="prob", type="Softmax", bottom=[scores or out.layer[-1].top[0]], top=["prob"])
    return out


def _blob_shapes(net_param):
    """{blob name: shape} of `net_param` built with batch 1 (shapes only; weights are not read)."""
    param = _copy(net_param)
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = 1
    net = Net(param, phase="TEST")
    return {name: blob.shape for name, blob in net.blobs.items()}


def _conv_from_inner_product(layer, bottom_shape):
    """The Convolution layer equal to InnerProduct `layer` on a bottom of `bottom_shape`."""
    ip = layer.inner_product_param
    if ip.axis not in (1, -len(bottom_shape)):
        raise VggcaffeError(f"layer '{layer.name}' (InnerProduct): axis {ip.axis} cannot become a "
                            "convolution; only axis 1 (all of C, H, W) can")
    kh, kw = (bottom_shape[2], bottom_shape[3]) if len(bottom_shape) == 4 else (1, 1)
    conv = _copy(layer)
    conv.type = "Convolution"
    conv.ClearField("inner_product_param")
    cp = conv.convolution_param
    cp.num_output, cp.bias_term = ip.num_output, ip.bias_term
    if kh == kw:
        cp.kernel_size.append(kh)
    else:
        cp.kernel_h, cp.kernel_w = kh, kw
    if ip.HasField("weight_filler"):
        cp.weight_filler.CopyFrom(ip.weight_filler)
    if ip.HasField("bias_filler"):
        cp.bias_filler.CopyFrom(ip.bias_filler)
    channels = int(np.prod(bottom_shape[1:2]))
    return conv, (ip.num_output, channels, kh, kw)


def fully_convolutional(net_param, weights):
    """FC->conv conversion (section 3.2). net_param: a deploy NetParameter (Input layer);
    weights: {layer name: [arrays]} (as read_weights gives, without the legacy flags).
    Returns (converted NetParameter, converted weights dict); inputs are not modified."""
    net_param = upgrade_net(_copy(net_param))
    if not is_deploy(net_param):
        raise VggcaffeError(f"net '{net_param.name}' has no Input layer; give a deploy net "
                            "(or make one with deploy_from_train_val)")
    shapes = _blob_shapes(net_param)
    renamed, out, new_weights = {}, _copy(net_param), dict(weights)
    out.ClearField("layer")
    for layer in net_param.layer:
        bottoms = [renamed.get(b, b) for b in layer.bottom]
        if layer.type == "Flatten":
            renamed[layer.top[0]] = bottoms[0]
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        new.ClearField("bottom")
        new.bottom.extend(bottoms)
        if layer.type != "InnerProduct":
            continue
        conv, shape = _conv_from_inner_product(new, shapes[bottoms[0]])
        new.CopyFrom(conv)
        if layer.name in weights:
            new_weights[layer.name] = _conv_weights(layer, weights[layer.name], shape)
    return out, new_weights


def _conv_weights(layer, arrays, shape):
    """InnerProduct weight (num_output, K) (or (K, num_output) transposed) -> (num_output, C, kh, kw)."""
    weight = np.asarray(arrays[0])
    if layer.inner_product_param.transpose:
        weight = weight.reshape(-1, shape[0]).T
    if weight.size != int(np.prod(shape)):
        raise VggcaffeError(f"layer '{layer.name}': weight has {weight.size} values, the converted "
                            f"convolution needs {shape}")
    return [weight.reshape(shape)] + [np.asarray(a) for a in arrays[1:]]


def net_weights(net):
    """{layer name: [arrays]} of a Net's parameters (host copies)."""
    from .backend import to_numpy
    return {name: [to_numpy(b.data) for b in blobs] for name, blobs in net.params.items()}


def load_into(net, weights):
    """Copy {layer name: [arrays]} into `net` by layer name; shapes must match."""
    for name, arrays in weights.items():
        blobs = net.params.get(name)
        if blobs is None:
            continue
        for j, (array, blob) in enumerate(zip(arrays, blobs)):
            if tuple(array.shape) != tuple(blob.shape):
                raise VggcaffeError(f"layer '{name}' param {j}: shape {tuple(array.shape)} does not fit "
                                    f"{tuple(blob.shape)}")
            blob.data[...] = blob._xp.asarray(array, dtype=blob.dtype)


def convert_files(model, weights, output):
    """`vggcaffe convert --fully-conv`: write OUTPUT.prototxt (the fully-convolutional net) and
    OUTPUT.npz (or .caffemodel when `weights` is one) holding the reshaped weights."""
    from pathlib import Path

    from .prototxt import read_net, write_text
    from .weights import read_weights
    param = read_net(model)
    deploy = param if is_deploy(param) else deploy_from_train_val(param)
    arrays = read_weights(weights)
    dtype = next((a.dtype for blobs in arrays.values() for a, _ in blobs), np.dtype(np.float32))
    fc_net = Net(deploy, phase="TEST", weights=str(weights), dtype=dtype, source=model)
    conv_param, conv_weights = fully_convolutional(deploy, net_weights(fc_net))
    conv_net = Net(conv_param, phase="TEST", dtype=dtype)
    load_into(conv_net, conv_weights)
    base = Path(output)
    base = base.with_suffix("") if base.suffix in (".prototxt", ".npz", ".caffemodel") else base
    net_path = base.parent / (base.name + ".prototxt")
    weights_path = base.parent / (base.name + (".caffemodel" if str(weights).endswith(".caffemodel") else ".npz"))
    write_text(conv_param, net_path)
    conv_net.save(weights_path)
    return net_path, weights_path


# ------------------------------------------------------------------ initialising deeper nets from A

def _block_roles(net_param):
    """[(block, index in block, layer name)] of the Convolution layers and [names] of the
    InnerProduct layers, in order; a Pooling layer closes a block."""
    convs, fcs, block, index = [], [], 1, 0
    for layer in net_param.layer:
        if layer.type == "Convolution":
            index += 1
            convs.append((block, index, layer.name))
        elif layer.type == "Pooling":
            block, index = block + 1, 0
        elif layer.type == "InnerProduct":
            fcs.append(layer.name)
    return convs, fcs


def init_from_a(source_model, source_weights, target_model, n_conv=4, n_fc=3):
    """The paper's pre-initialisation: {target layer: arrays} holding net A's first `n_conv`
    conv layers, each put where the target has a conv at the same place (block, index
    in block), and A's last `n_fc` fully-connected layers as the target's last `n_fc`.

    Places, not names, decide, so a target with other layer names works too; shapes
    must match (A's conv3_2 fills D's conv3_2: both are block 3's second 3x3 conv).
    """
    arrays = read_weights(source_weights)
    src_convs, src_fcs = _block_roles(read_net(source_model))
    dst_convs, dst_fcs = _block_roles(read_net(target_model))
    where = {(b, i): name for b, i, name in dst_convs}
    pairs = []
    for b, i, name in src_convs[:n_conv]:
        if (b, i) not in where:
            raise VggcaffeError(f"{target_model}: no conv layer at block {b}, position {i} for {name} of the source")
        pairs.append((name, where[(b, i)]))
    if len(src_fcs) < n_fc or len(dst_fcs) < n_fc:
        raise VggcaffeError(f"need {n_fc} InnerProduct layers in both nets; source has {len(src_fcs)}, "
                            f"target {len(dst_fcs)}")
    pairs += list(zip(src_fcs[len(src_fcs) - n_fc:], dst_fcs[len(dst_fcs) - n_fc:]))
    out = {}
    for src, dst in pairs:
        if src not in arrays:
            raise VggcaffeError(f"{source_weights}: no weights for layer '{src}'")
        out[dst] = [_drop_legacy_axes(array, legacy, j, dst in dst_fcs) for j, (array, legacy) in enumerate(arrays[src])]
    return out, pairs


def _drop_legacy_axes(array, legacy, index, is_fc):
    """A V1 caffemodel stores fc weights as 1x1xNxK and biases as 1x1x1xN: give their real shapes."""
    if not legacy:
        return array
    if index == 1:
        return array.reshape(-1)
    return array.reshape(array.shape[-2:]) if is_fc else array


def write_init_from_a(source_model, source_weights, target_model, output, n_conv=4, n_fc=3):
    """init_from_a, checked against the target net's shapes, written as .npz for --weights."""
    arrays, pairs = init_from_a(source_model, source_weights, target_model, n_conv, n_fc)
    param = read_net(target_model)
    if not is_deploy(param):
        param = deploy_from_train_val(param)
    for layer in param.layer:
        for shape in layer.input_param.shape:
            shape.dim[0] = 1
    target = Net(param, phase="TEST")
    for dst, values in arrays.items():
        blobs = target.params[dst]
        for j, value in enumerate(values):
            if tuple(blobs[j].shape) != value.shape:
                raise VggcaffeError(f"cannot put the source's weights into '{dst}' (param {j}): "
                                    f"shape {value.shape}, target has {tuple(blobs[j].shape)}")
    np.savez(output, **{f"{dst}/{j}": v for dst, values in arrays.items() for j, v in enumerate(values)})
    return pairs
