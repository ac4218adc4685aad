"""Synchronous data-parallel training over MPI: the paper's multi-GPU scheme (section 3.3).

`mpirun -np N vggcaffe train --solver S` starts N ranks (processes; on GPUs one
device each). Every rank runs the same solver on its own shard of each global
batch (the data layers' set_shard: rank-strided positions of one shared
shuffled order); after backward the gradients are averaged over the ranks and
every rank applies the same update, so the weights stay identical and equal
those of one process with the whole batch.

The Communicator is what the solver calls:
  bcast_seed(seed)             rank 0's random seed for every rank (same
                               initialisation and data order; the net mixes the
                               rank into augmentation draws)
  local_batch(p, source, ...)  with `global_batch: true`, the train net whose
                               data layers read batch_size / N each
  setup(solver)                checks that every rank has the same solver and
                               net, shards the data layers, broadcasts rank 0's
                               weights and prints the global batch
  reduce_during_backward(net)  before the last backward of a step: when
                               reducing layer-wise (see `layer_wise`), each
                               layer's gradients start their collective as soon
                               as backward has passed the layer, while the
                               layers below run backward
  allreduce_gradients(params, loss)
                               averages the gradients in place: waits for the
                               layer-wise collectives, or else reduces one
                               packed buffer per dtype; returns the mean loss
                               over the ranks
  broadcast_params(blobs)      rank 0's weights (after --weights, --snapshot)
  mean(values), bcast_object(obj)
                               display values averaged over the ranks; rank
                               0's plateau schedule (only rank 0 tests)
  decorrelate_rngs(net)        after a resume, distinct generators per rank
Collectives (vggcaffe.allreduce): MPI Allreduce on NumPy buffers (CPU); NCCL through cupy.cuda.nccl
on the GPU when every rank has its own device (VGGCAFFE_ALLREDUCE=mpi forces
MPI); else MPI on pinned host copies. An exception on any rank ends every rank
(MPI_Abort; the CLI does it, and an uncaught one does it through sys.excepthook).
A single process never imports mpi4py (or CuPy) through this module.
"""
import hashlib
import os
import sys

import numpy as np

from . import backend
from .allreduce import (LayerwiseReduce, MpiReducer, NcclReducer, PackedBuffers, PinnedMpiReducer, layer_wise,
                        nccl_available)
from .blob import Blob
from .errors import VggcaffeError
from .log import log

# Set by MPI launchers (Open MPI, MPICH/Intel MPI/PMI, MVAPICH) in every rank.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_active = []            # this process's Communicator, once made


def launched_by_mpi():
    """True when an MPI launcher started this process as one of several ranks."""
    for var in LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def abort_if_parallel(message, status=1, details=""):
    """Under MPI: print `details` (a traceback), then `message` with this rank, and abort
    every rank (never returns). In a single process: nothing."""
    if _active:
        if details:
            print(details, file=sys.stderr, end="", flush=True)
        _active[0].abort(message, status)


def split_global_batch(source, size, state=None):
    """The TRAIN net of `source` (path or NetParameter; `state` as Net's) with each data
    layer's batch_size divided by `size` (the solver's `global_batch: true`)."""
    from .graph import filter_net, net_state
    from .proto import caffe_pb2
    from .prototxt import read_text, upgrade_net
    if isinstance(source, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(source)
    else:
        param, _ = read_text(source, caffe_pb2.NetParameter())
    param = upgrade_net(param)
    param = filter_net(param, net_state(param, "TRAIN", state))
    for layer in param.layer:
        for field, value in layer.ListFields():
            if field.message_type is None or "batch_size" not in field.message_type.fields_by_name:
                continue
            if value.batch_size % size:
                raise VggcaffeError(f"layer '{layer.name}': global_batch is set, but {field.name}."
                                    f"batch_size {value.batch_size} is not divisible by the {size} ranks")
            value.batch_size //= size
    return param


class Communicator:
    """This process's place among the MPI ranks, and the collectives the solver needs."""

    def __init__(self):
        from mpi4py import MPI      # only multi-process runs import mpi4py
        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        local = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.reducer = None
        self.layerwise = None
        self._grads = PackedBuffers()
        _active[:] = [self]
        self._abort_on_uncaught_exception()

    # ------------------------------------------------------------ errors
    def abort(self, message, status=1):
        """Print one line naming this rank, then end every rank with `status` (MPI_Abort)."""
        sys.stdout.flush()
        print(f"vggcaffe: error: rank {self.rank} of {self.size}: {message}", file=sys.stderr, flush=True)
        self.world.Abort(status)

    def _abort_on_uncaught_exception(self):
        # Scripts that use the Communicator directly must not leave the other ranks waiting.
        previous = sys.excepthook

        def hook(kind, value, tb):
            previous(kind, value, tb)
            self.abort(f"{kind.__name__}: {value}", 1)
        sys.excepthook = hook

    # ------------------------------------------------------------ before the nets
    def bcast_seed(self, seed):
        """Rank 0's seed (drawn there when None), so every rank initialises and orders data alike."""
        if self.rank == 0 and seed is None:
            seed = int(np.random.SeedSequence().entropy)
        return self.world.bcast(seed, root=0)

    def device_for(self, first=0):
        """The GPU of this rank: its local rank counted from `first`, wrapping over the visible devices."""
        import cupy
        return (first + self.local_rank) % cupy.cuda.runtime.getDeviceCount()

    def local_batch(self, solver_param, source, state=None):
        """The train net source to build: unchanged, or split by split_global_batch when global_batch is set."""
        if not solver_param.global_batch:
            return source
        return split_global_batch(source, self.size, state)

    # ------------------------------------------------------------ after the nets
    def setup(self, solver):
        """Same definitions everywhere, sharded data, rank 0's weights; print the global batch."""
        self.check_same_definitions(solver)
        params = solver.net.learnable_params
        self.layerwise = None
        if params:
            self.reducer = self.make_reducer(params[0].data)
            if layer_wise(solver.param, self.reducer):
                self.layerwise = LayerwiseReduce(solver.net, self.reducer, self.size)
        shards = [layer for layer in solver.net.layers if hasattr(layer, "set_shard")]
        for layer in shards:
            layer.set_shard(self.rank, self.size)
        self.broadcast_params(params)
        root = self.rank == 0
        when = ", layer by layer during backward" if self.layerwise else ", after backward"
        log(f"Data parallel over {self.size} ranks; gradients averaged by "
            f"{self.reducer.name + when if self.reducer else 'nothing (no learnable params)'}", root=root)
        if not shards:
            log("Warning: the train net has no shardable data layer; every rank reads its own input", root=root)
            return
        batch, iter_size = shards[0].batch_size, max(1, solver.param.iter_size)
        extra = f" x iter_size {iter_size}" if iter_size > 1 else ""
        log(f"Global batch {batch * self.size * iter_size} = {self.size} ranks x {batch}{extra}", root=root)

    def check_same_definitions(self, solver):
        """Raise on every rank when the solver, train net or dtype differ between ranks."""
        digest = hashlib.sha256()
        for message in (solver.param, solver.net.param):
            digest.update(message.SerializeToString(deterministic=True))
        digest.update(str(solver.net.dtype).encode())
        digests = self.world.allgather(digest.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise VggcaffeError(f"the solver or net definition differs between ranks: rank(s) "
                                f"{', '.join(map(str, differ))} disagree with rank 0 (definition hashes "
                                f"{', '.join(d[:12] for d in digests)}); every rank must read the same "
                                f"solver, net prototxt and dtype (check the files on every node)")

    def make_reducer(self, array):
        """The collectives for buffers like `array`: MPI (CPU), NCCL, or MPI via pinned host copies."""
        if backend.array_module(array) is np:
            return MpiReducer(self.world)
        import cupy
        where = (self.MPI.Get_processor_name(), cupy.cuda.Device().pci_bus_id)
        shared = len(set(self.world.allgather(where))) < self.size
        nccl = all(self.world.allgather(nccl_available()))
        if nccl and not shared and os.environ.get("VGGCAFFE_ALLREDUCE") != "mpi":
            return NcclReducer(self.world)
        return PinnedMpiReducer(self.world)

    # ------------------------------------------------------------ every iteration
    def reduce_during_backward(self, net):
        """Let the next backward of `net` start each layer's collective (when layer-wise
        reduction is on for it)."""
        if self.layerwise is not None and self.layerwise.net is net:
            self.layerwise.arm()

    def allreduce_gradients(self, params, loss=0.0):
        """Average the params' diffs over the ranks in place; return the mean of `loss` over the ranks."""
        if self.layerwise is not None and self.layerwise.armed and params is self.layerwise.params:
            self.layerwise.finish()
        elif params:
            diffs = [blob.diff for blob in params]
            for flat in self._grads.pack(diffs):
                self.reducer.allreduce_sum(flat)
            self._grads.unpack(diffs, divide_by=self.size)
        return self.mean([loss])[0]

    def mean(self, values):
        """The element-wise mean over the ranks of a short list of floats (losses, outputs)."""
        values = np.asarray(values, dtype=np.float64)
        self.world.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return [float(v) / self.size for v in values]

    def bcast_object(self, obj):
        """Rank 0's value of a small picklable object (e.g. the plateau schedule's state)."""
        return self.world.bcast(obj, root=0)

    def broadcast_params(self, blobs):
        """Give every rank rank 0's values of `blobs` (Blobs' data, or plain arrays)."""
        arrays = [b.data if isinstance(b, Blob) else b for b in blobs]
        if not arrays:
            return
        if self.reducer is None:
            self.reducer = self.make_reducer(arrays[0])
        packed = PackedBuffers()        # not kept: a broadcast is rare, the buffer large
        for flat in packed.pack(arrays):
            self.reducer.bcast(flat)
        if self.rank != 0:
            packed.unpack(arrays)

    def decorrelate_rngs(self, net):
        """After a resume every rank holds rank 0's generator states: re-derive them per rank."""
        if self.rank == 0:
            return
        for layer in net.layers:
            layer.rng.bit_generator.state = _rank_state(layer.rng.bit_generator.state, self.rank)
            state = layer.state() if hasattr(layer, "set_state") else None
            if isinstance(state, dict) and "rng" in state:
                layer.set_state(dict(state, rng=_rank_state(state["rng"], self.rank)))


def _rank_state(state, rank):
    """A generator state derived from `state` and `rank` (deterministic, distinct per rank)."""
    kind = getattr(np.random, state["bit_generator"])
    source = kind()
    source.state = state
    words = np.random.Generator(source).integers(2**32, size=4)
    return kind([*(int(w) for w in words), rank]).state
