"""`vggcaffe time`: Caffe's benchmark of a net, layer by layer.

Runs forward and backward --iterations times and prints Caffe's table: the
average forward and backward time of every layer, the average forward,
backward and forward-backward pass, the total, and images per second. Data
layers are replaced by Input layers of the same tops (batch x 3 x crop x crop
images, or the source's size where the layer does not crop; integer labels)
filled once with random values, so the figures are compute alone. One untimed
forward-backward first builds the cuDNN graphs.
On the GPU every layer is timed with CUDA events on the device's clock.
"""
import time

import numpy as np

from . import backend, cpu
from .errors import VggcaffeError
from .log import log
from .net import Net
from .proto import caffe_pb2
from .prototxt import read_net

DATA_LAYERS = {"Data": "data_param", "ImageData": "image_data_param", "NpzData": "npz_data_param",
               "MemoryData": "memory_data_param"}


def synthetic_net(model, batch=None, crop=224):
    """The NetParameter of `model` with each data layer turned into an Input layer."""
    param = read_net(model) if not isinstance(model, caffe_pb2.NetParameter) else model
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    for layer in param.layer:
        new = out.layer.add()
        new.CopyFrom(layer)
        if layer.type in DATA_LAYERS:
            n = batch or getattr(layer, DATA_LAYERS[layer.type]).batch_size or 1
            image = _image_shape(layer, crop)
            for field in ("transform_param", DATA_LAYERS[layer.type]):
                new.ClearField(field)
            new.type = "Input"
            shapes = [[n, *image]] + [[n]] * (len(layer.top) - 1)
            for dims in shapes:
                new.input_param.shape.add().dim.extend(dims)
        elif layer.type == "Input" and batch:
            for shape in new.input_param.shape:
                shape.dim[0] = batch
    return out


def _image_shape(layer, crop):
    """(C, H, W) of a data layer's images: crop x crop when it crops; else what its source
    holds after its transform (read from the source), or crop x crop where that cannot be read."""
    from .data.transforms import Transformer
    from .layers import LAYER_TYPES
    if layer.transform_param.crop_size:
        size = layer.transform_param.crop_size
        return 3, size, size
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        return p.channels, p.height, p.width
    try:
        source = LAYER_TYPES[layer.type](layer, phase="TRAIN").open_source()
        return Transformer(layer.transform_param, "TRAIN", layer.name).output_shape(*source.first_shape())
    except VggcaffeError as e:
        log(f"data layer '{layer.name}' has no crop_size and its source cannot be read ({e}); "
            f"timing {crop}x{crop} images")
        return 3, crop, crop


def fill_inputs(net, seed=0):
    """Random N(0, 1) images in the first top of each Input layer, labels in [0, classes) in the others."""
    rng = np.random.default_rng(seed)
    for layer, top in zip(net.layers, net._tops):
        if layer.type != "Input":
            continue
        for k, blob in enumerate(top):
            if k == 0:
                values = rng.standard_normal(blob.shape, dtype=np.float32)
            else:
                values = rng.integers(0, _classes(net, blob), size=blob.shape).astype(np.float32)
            blob.data[...] = blob._xp.asarray(values)


def _classes(net, label_blob):
    """The smallest channel count among the score blobs compared with `label_blob`."""
    counts = [bottom[0].shape[1] for bottom in net._bottoms
              if len(bottom) > 1 and any(b is label_blob for b in bottom[1:]) and len(bottom[0].shape) > 1]
    return min(counts) if counts else 1


class _Clock:
    """Marks on the device's clock (CUDA events) in GPU mode, on the host's otherwise."""

    def __init__(self):
        self.gpu = backend.gpu_mode()
        if self.gpu:
            import cupy
            self.cupy = cupy

    def mark(self):
        if self.gpu:
            event = self.cupy.cuda.Event()
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end):
        if self.gpu:
            end.synchronize()
            return self.cupy.cuda.get_elapsed_time(start, end)
        return (end - start) * 1e3


def time_net(net, iterations):
    """Average per-layer forward/backward ms and pass totals over `iterations`."""
    n_layers = len(net.layers)
    forward, backward = np.zeros(n_layers), np.zeros(n_layers)
    net.forward_backward()
    clock = _Clock()
    total_start = clock.mark()
    for _ in range(iterations):
        marks = [clock.mark()]
        for i in range(n_layers):
            net._forward_layer(i)
            marks.append(clock.mark())
        for i in reversed(range(n_layers)):
            if net._need_backward[i]:
                net.layers[i].backward(net._tops[i], net._bottom_need[i], net._bottoms[i])
            marks.append(clock.mark())
        steps = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
        forward += steps[:n_layers]
        backward += steps[n_layers:][::-1]
    total = clock.ms(total_start, clock.mark())
    return forward / iterations, backward / iterations, total


def run_time(model, iterations=50, batch=None, phase="TRAIN", precision=None):
    """Build `model` with synthetic inputs, time it, log Caffe's table; returns img/s."""
    param = synthetic_net(model, batch)
    net = Net(param, phase=phase, source=model)
    if not net.loss_weights:        # a deploy net: time the backward of every layer anyway
        param.force_backward = True
        net = Net(param, phase=phase, source=model)
    if backend.gpu_mode():
        from . import gpu
        gpu.set_precision(precision or "fp32")
        gpu.prepare_net(net)
    else:
        if precision not in (None, "fp32"):
            log(f"precision {precision} applies on the GPU only; the CPU computes in float32")
        cpu.prepare_net(net)
    fill_inputs(net)
    batch_size = next((t[0].shape[0] for b, t in zip(net._bottoms, net._tops) if not b and t and t[0].shape), 1)
    log("*** Benchmark begins ***")
    log(f"Testing for {iterations} iterations.")
    forward, backward, total = time_net(net, iterations)
    log("Average time per layer: ")
    for name, f, b in zip(net._layer_names, forward, backward):
        log(f"{name:>14}\tforward: {f:.4g} ms.")
        log(f"{name:>14}\tbackward: {b:.4g} ms.")
    per_iter = total / iterations
    log(f"Average Forward pass: {forward.sum():.4g} ms.")
    log(f"Average Backward pass: {backward.sum():.4g} ms.")
    log(f"Average Forward-Backward: {per_iter:.4g} ms.")
    log(f"Total Time: {total:.4g} ms.")
    speed = batch_size * 1e3 / per_iter
    log(f"Throughput: {speed:.4g} img/s (batch {batch_size})")
    log("*** Benchmark ends ***")
    return speed
