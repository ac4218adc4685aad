"""Benchmark for SCALING.md: compute per iteration against the gradient allreduce.

    mpirun --oversubscribe --allow-run-as-root -np 2 python tools/bench_allreduce.py \
        [--count 138357544] [--repeats 5] [--model models/D_train_val.prototxt --batch 2 --iters 2] [--gpu]

Every rank does the same work at the same time, as in training. Rank 0 prints:
- allreduce: the collective the Communicator uses (MPI Allreduce on host
  buffers on the CPU; NCCL, or MPI through pinned host copies, with --gpu), sum
  in place over --count float32 values (default VGG-16's 138,357,544), median
  and min of --repeats after one warm-up, with the algorithm bandwidth
  (bytes / t) and the bus bandwidth (2 (N-1)/N x bytes / t, NCCL's convention);
- with --model: forward + backward of that net on synthetic inputs at --batch
  per rank (median of --iters after one warm-up), the Communicator's whole
  gradient step on the net's real parameters (pack, allreduce, / N, unpack),
  and a whole step (forward, backward, averaged gradients) both ways: one
  packed allreduce after backward and layer by layer during backward
  (layer_wise_reduce), with the time the overlap saves.
"""
import argparse
import time

import numpy as np

from vggcaffe import backend
from vggcaffe.allreduce import LayerwiseReduce
from vggcaffe.parallel import Communicator

VGG16_PARAMS = 138_357_544


def sync():
    if backend.gpu_mode():
        import cupy
        cupy.cuda.Device().synchronize()


def timed(fn, repeats, comm):
    """Seconds of each of `repeats` calls of fn after one warm-up, all ranks starting together."""
    fn()
    times = []
    for _ in range(repeats):
        comm.world.Barrier()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return np.array(times)


def report(comm, what, seconds, nbytes=None):
    line = f"{what}: median {np.median(seconds) * 1e3:.1f} ms, min {seconds.min() * 1e3:.1f} ms"
    if nbytes:
        t = np.median(seconds)
        bus = 2 * (comm.size - 1) / comm.size * nbytes / t
        line += f" ({nbytes / 1e6:.1f} MB: algorithm {nbytes / t / 1e9:.2f} GB/s, bus {bus / 1e9:.2f} GB/s)"
    if comm.rank == 0:
        print(line, flush=True)


def bench_allreduce(comm, count, repeats):
    xp = backend.xp()
    buffer = xp.ones(count, np.float32)
    reducer = comm.make_reducer(buffer)
    if comm.rank == 0:
        print(f"{comm.size} ranks, {reducer.name}", flush=True)
    seconds = timed(lambda: reducer.allreduce_sum(buffer), repeats, comm)
    report(comm, f"allreduce of {count:,} float32", seconds, buffer.nbytes)


def bench_model(comm, model, batch, iters, repeats):
    from vggcaffe.net import Net
    from vggcaffe.timing import fill_inputs, synthetic_net
    net = Net(synthetic_net(model, batch), phase="TRAIN", rank=comm.rank)
    fill_inputs(net)
    params = net.learnable_params
    count = sum(b.count for b in params)
    comm.reducer = comm.make_reducer(params[0].data)
    report(comm, f"compute: forward+backward of {net.name} at batch {batch} per rank",
           timed(lambda: (net.clear_param_diffs(), net.forward_backward()), iters, comm))
    report(comm, f"gradient step (pack, allreduce, /N, unpack) of {count:,} params",
           timed(lambda: comm.allreduce_gradients(params), repeats, comm), count * params[0].data.itemsize)
    layerwise = LayerwiseReduce(net, comm.reducer, comm.size)

    def after_backward():
        comm.layerwise = None
        net.clear_param_diffs()
        net.forward_backward()
        comm.allreduce_gradients(params)

    def during_backward():                   # the solver's calls (SGDSolver.forward_backward)
        comm.layerwise = layerwise
        net.clear_param_diffs()
        comm.reduce_during_backward(net)
        net.forward_backward()
        comm.allreduce_gradients(params)
    packed = timed(after_backward, iters, comm)
    overlapped = timed(during_backward, iters, comm)
    report(comm, "whole step, one packed allreduce after backward", packed)
    report(comm, f"whole step, layer by layer during backward ({len(layerwise.buckets)} collectives)", overlapped)
    if comm.rank == 0:
        saved = np.median(packed) - np.median(overlapped)
        print(f"overlap saves {saved * 1e3:.1f} ms per step ({saved / np.median(packed):.1%})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=VGG16_PARAMS, help="floats to allreduce")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="a train_val prototxt to time (data layers become synthetic inputs)")
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch for --model")
    parser.add_argument("--iters", type=int, default=2, help="timed iterations of --model")
    parser.add_argument("--gpu", action="store_true", help="one GPU per rank (local rank), CuPy buffers")
    args = parser.parse_args()
    comm = Communicator()
    if args.gpu:
        backend.set_mode_gpu()
        backend.set_device(comm.device_for(0))
    bench_allreduce(comm, args.count, args.repeats)
    if args.model:
        bench_model(comm, args.model, args.batch, args.iters, args.repeats)


if __name__ == "__main__":
    main()
