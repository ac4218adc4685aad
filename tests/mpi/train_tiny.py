"""Run under mpirun: train the tiny net for a few iterations in every rank and save
each rank's weights and losses, per case, as <out>/<case>_rank<r>.npz.

usage: mpirun -np N python tests/mpi/train_tiny.py OUT_DIR PER_RANK_BATCH ITERS [gpu]
With "gpu", rank r runs on GPU (local rank r) mod (device count). Cases: f64 (per-rank batch b,
layer_wise_reduce: false: one packed collective after backward); f32 (the default
reduction: after backward on host MPI, layer by layer with NCCL); layerwise (float64,
layer_wise_reduce: true: collectives started during backward);
iter_size (float64, batch b/2, iter_size 2, layer_wise_reduce: true); global (float64,
global_batch: true, batch N*b); resumed (float64: a snapshot at ITERS/2 restored by a new
solver, then trained on to ITERS; also saves the data layer's generator state).
With VGGCAFFE_FAKE_GPU=1, "gpu" runs on tests/fake_gpu.py's stand-ins.
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

if os.environ.get("VGGCAFFE_FAKE_GPU") == "1":    # the GPU tests on NumPy stand-ins (tests/fake_gpu.py)
    sys.path.insert(0, str(Path(__file__).parents[2]))
    from tests.fake_gpu import install
    install()

from vggcaffe import backend  # noqa: E402
from vggcaffe.parallel import Communicator  # noqa: E402
from vggcaffe.solver import SGDSolver  # noqa: E402


def weights(solver):
    return {name: backend.to_numpy(blob.data)
            for name, blob in zip(solver.net.param_names, solver.net.learnable_params)}


def train(comm, param, dtype, iters):
    solver = SGDSolver(param, dtype=dtype, comm=comm)
    losses = []
    for _ in range(iters):
        solver.step(1)
        losses.append(solver.losses[-1])
    return dict(weights(solver), losses=np.array(losses))


def resumed(comm, batch, iters, out):
    half = iters // 2
    prefix = f'snapshot: {half} snapshot_prefix: "{out}/snap"'
    SGDSolver(tiny.solver_param(batch, iters, prefix), dtype=np.float64, comm=comm).step(half)
    comm.world.Barrier()
    solver = SGDSolver(tiny.solver_param(batch, iters, prefix), dtype=np.float64, comm=comm)
    solver.restore(f"{out}/snap_iter_{half}.solverstate")
    data_rng = solver.net.layer_dict["data"].state()["rng"]["state"]["state"]
    solver.step(iters - half)
    return dict(weights(solver), data_rng=np.array(str(data_rng)))


def main(out, batch, iters, device="cpu"):
    comm = Communicator()
    if device == "gpu":
        backend.set_mode_gpu()
        backend.set_device(comm.device_for(0))
    cases = {"f64": train(comm, tiny.solver_param(batch, iters, "layer_wise_reduce: false"), np.float64, iters),
             "f32": train(comm, tiny.solver_param(batch, iters), np.float32, iters),
             "layerwise": train(comm, tiny.solver_param(batch, iters, "layer_wise_reduce: true"), np.float64, iters),
             "iter_size": train(comm, tiny.solver_param(batch // 2, iters, "iter_size: 2 layer_wise_reduce: true"),
                                np.float64, iters),
             "global": train(comm, tiny.solver_param(batch * comm.size, iters, "global_batch: true"),
                             np.float64, iters),
             "resumed": resumed(comm, batch, iters, out)}
    for case, arrays in cases.items():
        np.savez(Path(out) / f"{case}_rank{comm.rank}.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
