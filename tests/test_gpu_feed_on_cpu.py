"""The GPU data feed (vggcaffe/gpu/feed.py) on the CPU, against a stand-in CuPy whose
streams are asynchronous in the ways that matter.

On a GPU the upload (copy stream) and the copy into the data top (compute stream)
run later than the host code that queued them. The stand-in runs one stream at
once and queues the other's work until something waits for it:
- "lazy uploads": the copy stream's work runs only when an event recorded on it
  is waited for, so a forward that did not wait for the upload reads stale data;
- "lazy compute": the compute stream's work (the copy into the top, and the
  test's reads of it) runs only at a wait, so a prefetch thread that refilled a
  slot before its batch was copied out would hand the wrong batch on.
Either way the batches must equal those of the same layer on NumPy. Each forward
waits until the prefetch queue is full, so the feed runs as far ahead as it can.
"""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.gradient_check import make_layer
from vggcaffe.blob import Blob

from .cuda_on_cpu import gpu_modules

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette_32.npz"
pytestmark = pytest.mark.skipif(not NPZ.exists(), reason=f"real test data not found at {NPZ}")


class Stream:
    """Work queued in order; `eager` streams run it at once."""

    def __init__(self, eager=False):
        self.eager, self.ops, self.done = eager, [], 0
        self.lock = threading.RLock()

    def enqueue(self, op):
        with self.lock:
            self.ops.append(op)
        if self.eager:
            self.synchronize()

    def run_until(self, mark):
        with self.lock:
            while self.done < mark:
                self.done += 1
                self.ops[self.done - 1]()

    def synchronize(self):
        self.run_until(len(self.ops))

    def wait_event(self, event):
        self.enqueue(event.synchronize)

    def __enter__(self):                 # the current stream for allocations: nothing to do here
        return self

    def __exit__(self, *exc):
        return False


class Event:
    def __init__(self, block=False, disable_timing=False):
        self.stream, self.mark = None, 0

    def record(self, stream=None):
        self.stream = stream or FAKE.compute
        with self.stream.lock:
            self.mark = len(self.stream.ops)

    def synchronize(self):
        if self.stream is not None:
            self.stream.run_until(self.mark)


class DeviceArray(np.ndarray):
    """A "device" array: NumPy memory; copies between device arrays are compute-stream
    work, uploads (`set` with a stream) copy-stream work, both reading their source
    when they run."""

    def set(self, host, stream=None):
        op = lambda: np.copyto(self.view(np.ndarray), host)      # noqa: E731
        stream.enqueue(op) if stream is not None else op()

    def __setitem__(self, key, value):
        if isinstance(value, DeviceArray):
            FAKE.compute.enqueue(lambda: np.ndarray.__setitem__(self, key, value.view(np.ndarray)))
        else:
            np.ndarray.__setitem__(self, key, value)


DeviceArray.__module__ = "cupy"         # vggcaffe.backend.array_module tells CuPy arrays by this


class Fake:
    """The parts of cupy.cuda the feed uses, with the compute or the copy stream lazy."""

    def __init__(self, lazy):
        self.lazy = lazy
        self.compute = Stream(eager=lazy != "compute")
        self.cuda = type("cuda", (), {})()
        self.cuda.Event = Event
        self.cuda.Stream = lambda non_blocking=False: Stream(eager=lazy != "uploads")
        self.cuda.get_current_stream = lambda: self.compute
        self.cuda.alloc_pinned_memory = bytearray
        self.cuda.Device = lambda device_id=0: type("Device", (), {"id": device_id, "use": lambda s: None})()

    def attributes(self):
        device = lambda f: lambda shape, dtype=np.float32: f(shape, dtype).view(DeviceArray)   # noqa: E731
        return {"cuda": self.cuda, "ndarray": DeviceArray, "empty": device(np.empty), "zeros": device(np.zeros)}


FAKE = None


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the prefetch thread did not fill its queue"
        time.sleep(0.005)
    time.sleep(0.02)                                # and let it start on the next batch


def npz_layer(xp=None, prefetch=3):
    text = (f'name: "data" type: "NpzData" top: "data" top: "label" '
            f'npz_data_param {{ source: "{NPZ}" batch_size: 8 shuffle: true }} '
            f'transform_param {{ crop_size: 28 mirror: true mean_value: 120 scale: 0.01 }}')
    layer, _, top = make_layer(text, [], n_tops=2, seed=3)
    layer.prefetch = prefetch
    if xp is not None:
        top = [Blob(t.shape, t.dtype, xp=xp) for t in top]
    return layer, top


def reference_batches(steps):
    layer, top = npz_layer(prefetch=0)
    out = []
    for _ in range(steps):
        layer.forward([], top)
        out.append((top[0].data.copy(), top[1].data.copy()))
    layer.close()
    return out


@pytest.mark.parametrize("lazy", ["uploads", "compute"])
def test_staged_batches_equal_the_host_batches(lazy):
    global FAKE
    FAKE = Fake(lazy)
    steps = 13                                      # the 5 slots go round more than twice
    with gpu_modules(("feed",), **FAKE.attributes()) as gpu:
        import cupy
        layer, top = npz_layer(xp=cupy)
        got = []
        try:
            for step in range(steps):
                if step:                            # the prefetch queue full: the feed as far ahead as it goes
                    wait_until(layer._prefetcher._queue.full)
                layer.forward([], top)
                assert isinstance(layer._stager, gpu.feed.Stager)
                data, label = top[0].data, top[1].data          # read when the compute stream gets here
                FAKE.compute.enqueue(lambda d=data, lab=label: got.append((np.array(d), np.array(lab))))
            FAKE.compute.synchronize()
        finally:
            layer.close()
    assert layer._stager is None
    want = reference_batches(steps)
    assert len(got) == steps
    for (d, lab), (wd, wlab) in zip(got, want):
        np.testing.assert_array_equal(d, wd)
        np.testing.assert_array_equal(lab, wlab)
