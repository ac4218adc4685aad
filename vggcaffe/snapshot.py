"""Solver snapshots: <prefix>_iter_<N>.npz (or .caffemodel) plus <prefix>_iter_<N>.solverstate.

Both files are written to a temporary file and renamed, so an interrupted run
never leaves a half-written snapshot. The .solverstate is Caffe's SolverState
message (iter, learned_net, history, current_step) with vggcaffe's additions:
the plateau schedule's state and, as JSON, every random generator's state and
every data layer's position, so a resumed run repeats an uninterrupted one.
"""
import json
import tempfile
from pathlib import Path

from google.protobuf.message import DecodeError

from . import backend
from .errors import VggcaffeError
from .proto import caffe_pb2
from .weights import _atomic_write, blob_proto_pieces, blob_proto_to_array, load_weights, message_field, save_weights


def check_snapshot_settings(p, probe=True):
    """Raise now, not at the first snapshot, when the solver cannot snapshot: HDF5 asked
    for, a snapshot interval without snapshot_prefix, or (`probe`) a prefix whose folder,
    or the nearest existing folder above it, cannot be written (Caffe's
    CheckSnapshotWritePermissions; the folder itself is made at the first snapshot). Returns whether
    the solver can snapshot (a solver file always has a prefix: see read_solver; a
    SolverParameter built in Python may have none, and then writes no snapshot)."""
    if p.HasField("snapshot_format") and p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        raise VggcaffeError("snapshot_format HDF5 is not supported; use BINARYPROTO or leave it unset for .npz")
    if not p.snapshot_prefix:
        if p.snapshot:
            raise VggcaffeError(f"solver snapshots every {p.snapshot} iterations but has no snapshot_prefix")
        return False
    if probe:
        folder = _prefix(p).parent                 # made at the first snapshot: probe its nearest existing one
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(20, "not a folder", str(folder))
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise VggcaffeError(f"cannot write to snapshot_prefix '{p.snapshot_prefix}' ({e.strerror}: "
                                f"{e.filename or folder}); make sure that folder is writable") from None
    return True


def _prefix(p):
    return Path(p.snapshot_prefix + ("snapshot" if p.snapshot_prefix.endswith("/") else ""))


def snapshot_paths(solver):
    p = solver.param
    check_snapshot_settings(p, probe=False)
    if not p.snapshot_prefix:
        raise VggcaffeError("solver has no snapshot_prefix; set one to snapshot")
    ext = ".caffemodel" if p.HasField("snapshot_format") else ".npz"
    base = f"{_prefix(p)}_iter_{solver.iter}"
    return Path(base + ext), Path(base + ".solverstate")


def _rng_states(solver):
    nets = {"train": solver.net, **{f"test{i}": n for i, n in enumerate(solver.test_nets)}}
    out = {}
    for key, net in nets.items():
        out[key] = {name: {"rng": layer.rng.bit_generator.state,
                           "data": layer.state() if hasattr(layer, "state") else None}
                    for name, layer in net.layer_dict.items()}
    return out


def _set_rng_states(solver, states):
    nets = {"train": solver.net, **{f"test{i}": n for i, n in enumerate(solver.test_nets)}}
    for key, layers in states.items():
        net = nets.get(key)
        if net is None:
            continue
        for name, state in layers.items():
            layer = net.layer_dict.get(name)
            if layer is None:
                continue
            layer.rng.bit_generator.state = state["rng"]
            if state["data"] is not None and hasattr(layer, "set_state"):
                layer.set_state(state["data"])


def write_snapshot(solver):
    weights_path, state_path = snapshot_paths(solver)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(solver.net, weights_path)
    # SolverState's fields in number order: iter (1), learned_net (2), history (3), the rest (4, 100-103)
    head = caffe_pb2.SolverState(iter=solver.iter, learned_net=str(weights_path))
    tail = caffe_pb2.SolverState(current_step=solver.current_step, plateau_wait=solver.plateau.wait,
                                 plateau_reductions=solver.plateau.reductions,
                                 rng_state=json.dumps(_rng_states(solver)))
    if solver.plateau.best is not None:
        tail.plateau_best = solver.plateau.best
    pieces = [head.SerializeToString()]
    for hist in solver.history:
        pieces += message_field(3, blob_proto_pieces(backend.to_numpy(hist)))
    pieces.append(tail.SerializeToString())
    _atomic_write(state_path, lambda f: f.writelines(pieces))
    return weights_path, state_path


def restore_state(solver, path):
    path = Path(path)
    if path.suffix in (".npz", ".caffemodel"):
        raise VggcaffeError(f"{path}: --snapshot takes a .solverstate file; use --weights for {path.suffix}")
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(path.read_bytes())
    except FileNotFoundError:
        raise VggcaffeError(f"{path}: no such solver state file") from None
    except OSError as e:
        raise VggcaffeError(f"{path}: cannot read the solver state ({e.strerror})") from None
    except DecodeError as e:
        raise VggcaffeError(f"{path}: not a SolverState file: {e}") from None
    if len(state.history) != len(solver.history):
        raise VggcaffeError(f"{path}: holds {len(state.history)} history blobs but this {solver.kind} solver "
                            f"keeps {len(solver.history)} for its net (wrong net or solver type?)")
    learned = Path(state.learned_net)
    if not learned.exists() and (path.parent / learned.name).exists():
        learned = path.parent / learned.name
    load_weights(solver.net, learned)
    for j, (proto, hist) in enumerate(zip(state.history, solver.history)):
        array, _ = blob_proto_to_array(proto)
        if array.size != hist.size:
            raise VggcaffeError(f"{path}: history {j} has {array.size} values, param has {hist.size}")
        hist[...] = backend.array_module(hist).asarray(array.reshape(hist.shape), dtype=hist.dtype)
    solver.iter, solver.current_step = state.iter, state.current_step
    solver.plateau.best = state.plateau_best if state.HasField("plateau_best") else None
    solver.plateau.wait, solver.plateau.reductions = state.plateau_wait, state.plateau_reductions
    if state.rng_state:
        try:
            _set_rng_states(solver, json.loads(state.rng_state))
        except (ValueError, TypeError, KeyError) as e:
            raise VggcaffeError(f"{path}: its random generator states are damaged ({e})") from None
