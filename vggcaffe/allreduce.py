"""Gradient collectives for data-parallel training (used by vggcaffe.parallel).

PackedBuffers copies a list of arrays into one contiguous buffer per dtype (one
collective instead of one per param); LayerwiseReduce starts each layer's
collective as soon as backward has passed it (Caffe's layer_wise_reduce). The
transports share one interface, allreduce_sum(flat), bcast(flat) and the
nonblocking start(flat) -> handle, progress(handles), wait(handle):
  MpiReducer        MPI on NumPy buffers (CPU ranks)
  PinnedMpiReducer  MPI on pinned host copies of GPU buffers (ranks that share
                    a GPU, or no NCCL)
  NcclReducer       NCCL on the device buffers (cupy.cuda.nccl)
"""
import numpy as np

from . import backend
from .errors import VggcaffeError

NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


def layer_wise(solver_param, reducer):
    """Whether to reduce layer by layer during backward. The solver's layer_wise_reduce
    (Caffe's field 41) decides when given; unset, it is Caffe's default (true) for NCCL,
    whose collectives run on the device beside backward, and false for MPI on host
    buffers, whose collectives take the CPU the ranks compute on: there, on 2 ranks of a
    2-core machine, it made VGG-16 steps 10-21% slower (SCALING.md)."""
    if solver_param.HasField("layer_wise_reduce"):
        return solver_param.layer_wise_reduce
    return isinstance(reducer, NcclReducer)


def nccl_available():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", True))


class PackedBuffers:
    """One contiguous buffer per dtype for a list of same-device arrays, reused across calls."""

    def __init__(self):
        self.signature, self.groups = None, []

    def _layout(self, arrays):
        signature = tuple((a.shape, a.dtype.str) for a in arrays)
        if signature == self.signature:
            return
        xp = backend.array_module(arrays[0])
        by_dtype = {}
        for i, a in enumerate(arrays):
            by_dtype.setdefault(a.dtype.str, []).append(i)
        self.groups = []
        for indices in by_dtype.values():
            offsets = np.cumsum([0] + [arrays[i].size for i in indices])
            flat = xp.empty(int(offsets[-1]), arrays[indices[0]].dtype)
            self.groups.append((flat, [(i, int(o), arrays[i].size) for i, o in zip(indices, offsets)]))
        self.signature = signature

    def pack(self, arrays):
        """Copy `arrays` into the buffers; returns the buffers (one per dtype)."""
        self._layout(arrays)
        for flat, spans in self.groups:
            for i, offset, n in spans:
                flat[offset:offset + n] = arrays[i].ravel()
        return [flat for flat, _ in self.groups]

    def unpack(self, arrays, divide_by=1):
        """Copy the buffers, divided by `divide_by`, back into `arrays` (the list that was packed)."""
        xp = backend.array_module(arrays[0])
        for flat, spans in self.groups:
            for i, offset, n in spans:
                xp.divide(flat[offset:offset + n].reshape(arrays[i].shape), divide_by, out=arrays[i])


class LayerwiseReduce:
    """Caffe's layer_wise_reduce: the gradients of a layer's params are summed over the
    ranks as soon as backward has passed that layer, while the layers below it run
    backward (one nonblocking collective per layer with params and dtype, on a packed
    buffer of its own). A param shared by several layers goes with the lowest of them, whose
    backward is its last. Armed for the last backward of a step (the last of
    iter_size); `finish` waits for every collective and writes the means back into
    the diffs. Reducers give start(flat) -> handle, progress(handles), wait(handle)."""

    def __init__(self, net, reducer, size):
        self.net, self.params, self.reducer, self.size = net, net.learnable_params, reducer, size
        owner = {}
        for i, layer in enumerate(net.layers):
            for blob in layer.blobs:
                owner.setdefault(id(blob), i)              # the lowest layer holding it
        self.buckets = {}                                   # layer index -> param indices
        for k, blob in enumerate(self.params):
            self.buckets.setdefault(owner[id(blob)], []).append(k)
        self.buffers = {i: PackedBuffers() for i in self.buckets}
        self.pending, self.armed = {}, False
        net.after_backward.append(self.after_layer)

    def arm(self):
        """Start collectives during the next backward (any left from a step never finished
        are waited for and dropped)."""
        for handles in self.pending.values():
            for handle in handles:
                self.reducer.wait(handle)
        self.pending, self.armed = {}, True

    def after_layer(self, i):
        if not self.armed:
            return
        if i in self.buckets and i not in self.pending:
            self._start(i)
        self.reducer.progress([h for handles in self.pending.values() for h in handles])

    def _start(self, i):
        diffs = [self.params[k].diff for k in self.buckets[i]]
        self.pending[i] = [self.reducer.start(flat) for flat in self.buffers[i].pack(diffs)]

    def finish(self):
        """Wait for every layer's collective (starting those backward did not reach) and
        leave the mean over the ranks in each diff."""
        for i in self.buckets:
            if i not in self.pending:
                self._start(i)
        for i, handles in self.pending.items():
            for handle in handles:
                self.reducer.wait(handle)
            self.buffers[i].unpack([self.params[k].diff for k in self.buckets[i]], divide_by=self.size)
        self.pending, self.armed = {}, False


class MpiReducer:
    """MPI Allreduce / Bcast in place on NumPy buffers (the CPU path). Nonblocking
    collectives (Iallreduce) advance when MPI is called: `progress` tests them."""
    name = "MPI Allreduce on host buffers"

    def __init__(self, world):
        from mpi4py import MPI
        self.MPI, self.world = MPI, world

    def allreduce_sum(self, flat):
        self.world.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)

    def bcast(self, flat):
        self.world.Bcast(flat, root=0)

    def start(self, flat):
        return self.world.Iallreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)

    def progress(self, handles):
        if handles:
            self.MPI.Request.Testall(handles)

    def wait(self, handle):
        handle.Wait()


class PinnedMpiReducer(MpiReducer):
    """GPU buffers reduced by MPI through pinned host copies (ranks share a GPU, or no NCCL)."""
    name = "MPI Allreduce on pinned host copies of GPU buffers"

    def __init__(self, world):
        super().__init__(world)
        self.host = {}

    def _host(self, flat, own=False):
        """A pinned host array for `flat`: one per (dtype, size) for the blocking collectives,
        one per device buffer (`own`) for the nonblocking ones, several of which are in flight."""
        key = (flat.dtype.str, flat.size) + ((flat.data.ptr,) if own else ())
        if key not in self.host:
            from .gpu.feed import pinned_empty
            self.host[key] = pinned_empty(flat.size, flat.dtype)
        return self.host[key]

    def allreduce_sum(self, flat):
        host = flat.get(out=self._host(flat))
        super().allreduce_sum(host)
        flat.set(host)

    def bcast(self, flat):
        host = flat.get(out=self._host(flat))
        super().bcast(host)
        flat.set(host)

    def start(self, flat):
        host = flat.get(out=self._host(flat, own=True))   # waits for the device's work so far
        return super().start(host), flat, host

    def progress(self, handles):
        super().progress([request for request, _, _ in handles])

    def wait(self, handle):
        request, flat, host = handle
        request.Wait()
        flat.set(host)


class NcclReducer:
    """NCCL allreduce / broadcast on device buffers; the unique id travels over MPI."""
    name = "NCCL allreduce on GPU buffers"

    def __init__(self, world):
        from cupy.cuda import nccl
        self.nccl = nccl
        uid = world.bcast(nccl.get_unique_id() if world.Get_rank() == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(world.Get_size(), uid, world.Get_rank())
        self.stream = None          # the side stream of layer-wise allreduces, made on first use

    def _args(self, flat):
        import cupy
        kind = NCCL_TYPES.get(flat.dtype.name)
        if kind is None:
            raise VggcaffeError(f"NCCL cannot reduce {flat.dtype} gradients; use float16, float32 or float64")
        return flat.data.ptr, flat.size, getattr(self.nccl, kind), cupy.cuda.get_current_stream().ptr

    def allreduce_sum(self, flat):
        ptr, count, kind, stream = self._args(flat)
        self.comm.allReduce(ptr, ptr, count, kind, self.nccl.NCCL_SUM, stream)

    def bcast(self, flat):
        ptr, count, kind, stream = self._args(flat)
        self.comm.bcast(ptr, count, kind, 0, stream)

    def start(self, flat):
        """Allreduce on a side stream once the current stream's work so far is done; the
        current stream goes on with backward. The handle is the side stream's event."""
        import cupy
        if self.stream is None:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        ptr, count, kind, _ = self._args(flat)
        self.comm.allReduce(ptr, ptr, count, kind, self.nccl.NCCL_SUM, self.stream.ptr)
        return self.stream.record()

    def progress(self, handles):
        """NCCL runs on the device: nothing to drive from the host."""

    def wait(self, handle):
        import cupy
        cupy.cuda.get_current_stream().wait_event(handle)
