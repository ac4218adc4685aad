"""The data layers' host-to-device feed: batches uploaded to the GPU ahead of their use.

A data layer makes its batches on the host (NumPy) in a prefetch thread. On the
GPU the same thread also stages each batch (`Stager`): it copies the arrays
into pinned (page-locked) host memory and starts their upload on a copy stream
of its own, recording an event when the upload is done. The layer's forward
(`Staged.deliver`) makes the compute stream wait for that event and copies the
device buffers into its tops (device to device), so the upload overlaps the
previous iterations' compute, and the host never blocks on a copy from
pageable memory (as `cupy.asarray(host_array)` does, after all queued work).
This is Caffe's design (its prefetch thread pushes each batch to the GPU on a
stream of its own); PyTorch's pin_memory + non_blocking copies free the host
too, but copy on the compute stream. So, as in Caffe, each prefetched batch
also holds device memory: depth + 2 batches per data layer (5 x 38.5 MB for
VGG's 64 x 3 x 224 x 224 float32).

Batches live in a ring of slots (pinned and device buffers, a `ready` event
recorded on the copy stream and a `free` event recorded on the compute stream
once the batch is copied out). The thread refills a slot only after its
`free` event: with `depth` batches in the prefetch queue, one being staged
and one being delivered, depth + 2 slots never wait on a batch not yet
delivered (a forward delivers the batch it takes before taking another).
`VGGCAFFE_GPU_FEED=0` turns the feed off (forward uploads with cupy.asarray),
for comparisons. Imported only on the GPU path.
"""
import cupy
import numpy as np


def pinned_empty(shape, dtype):
    """A NumPy array of `shape` and `dtype` in pinned (page-locked) host memory."""
    count = int(np.prod(shape, dtype=np.int64))
    memory = cupy.cuda.alloc_pinned_memory(max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(memory, dtype, count).reshape(shape)


class _Slot:
    """Pinned and device buffers for one batch, and its two events."""

    def __init__(self):
        self.host, self.device = [], []
        # blocking events: a thread waiting on one sleeps instead of spinning on a core
        self.ready = cupy.cuda.Event(block=True, disable_timing=True)    # the upload is done (copy stream)
        self.free = cupy.cuda.Event(block=True, disable_timing=True)     # copied out (compute stream)

    def fit(self, arrays, stream):
        """Buffers of the arrays' shapes and dtypes (kept while they match). The device
        buffers come from `stream`'s share of CuPy's pool: memory the compute stream freed
        may still be in use by its queued kernels, which the copy stream does not wait for."""
        if [(a.shape, a.dtype) for a in arrays] != [(h.shape, h.dtype) for h in self.host]:
            self.host = [pinned_empty(a.shape, a.dtype) for a in arrays]
            with stream:
                self.device = [cupy.empty(a.shape, a.dtype) for a in arrays]


class Staged:
    """A batch uploaded, or being uploaded, to the GPU; deliver it exactly once."""

    def __init__(self, slot):
        self._slot = slot

    def deliver(self, tops):
        """tops[i].data = the batch's i-th array (reshaping the blob), queued on the
        current stream after the upload; the slot is free again once these copies ran."""
        stream = cupy.cuda.get_current_stream()
        stream.wait_event(self._slot.ready)
        for top, array in zip(tops, self._slot.device):
            top.reshape(array.shape)
            top.data[...] = array
        self._slot.free.record(stream)


class Stager:
    """Callable wrapping a batch producer (out=None) -> (data, labels, state): returns
    (Staged([data, labels]), None, state), the upload started. The producer may
    write the data straight into the slot's pinned buffer (`out`). Called from one
    thread (the prefetcher's) at a time; `close()` after that thread stopped."""

    def __init__(self, produce, depth):
        self.produce = produce
        self.device_id = cupy.cuda.Device().id
        self.slots = [None] * (int(depth) + 2)
        self.count = 0
        self.stream = None

    def __call__(self):
        cupy.cuda.Device(self.device_id).use()         # this thread's device
        if self.stream is None:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        k = self.count % len(self.slots)
        if self.slots[k] is None:
            self.slots[k] = _Slot()
        slot = self.slots[k]
        slot.free.synchronize()                        # its last batch has been copied out
        data, labels, state = self.produce(out=slot.host[0] if slot.host else None)
        arrays = [np.ascontiguousarray(data), np.ascontiguousarray(labels)]
        slot.fit(arrays, self.stream)
        for host, device, array in zip(slot.host, slot.device, arrays):
            if host is not array:                      # the transform wrote the data in place
                np.copyto(host, array)
            device.set(host, stream=self.stream)
        slot.ready.record(self.stream)
        self.count += 1
        return Staged(slot), None, state

    def close(self):
        """Wait for uploads and copies out still queued, so the buffers can be freed. The
        prefetch thread calls it as it ends (also when the layer is garbage collected)."""
        if self.stream is not None:
            self.stream.synchronize()
        for slot in self.slots:
            if slot is not None:
                slot.free.synchronize()
        self.slots = [None] * len(self.slots)
