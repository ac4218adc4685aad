"""SGD with momentum, exactly as Caffe's SGDSolver, plus the paper's reduce-on-plateau schedule.

Per iteration: zero param diffs; iter_size x forward/backward (gradients add
up); clip by global L2 norm; then per learnable param: diff /= iter_size,
diff += weight_decay * decay_mult * data (L2; sign(data) for L1),
history = momentum * history + lr * lr_mult * diff, data -= history.
The solver `type` may also be one of Caffe's others (Nesterov, AdaGrad,
RMSProp, AdaDelta, Adam: vggcaffe/update_rules.py); the fused GPU update
serves SGD, the others run as elementwise CuPy there.
Tests, display lines, snapshots and Ctrl-C handling follow Caffe's Solver.
"""
import math
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np

from . import backend, cpu, update_rules
from .errors import VggcaffeError
from .log import log, progress
from .net import Net
from .proto import caffe_pb2
from .prototxt import read_solver
from .snapshot import check_snapshot_settings, restore_state, write_snapshot
from .threads import over_items, scratch

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "plateau")


def learning_rate(p, it, current_step=0, reductions=0):
    """Caffe's GetLearningRate for `p` (a SolverParameter) at iteration `it`."""
    policy, base = p.lr_policy, p.base_lr
    if policy == "fixed":
        return base
    if policy == "step":
        if p.stepsize <= 0:
            raise VggcaffeError("lr_policy 'step' needs a positive stepsize")
        return base * p.gamma ** (it // p.stepsize)
    if policy == "exp":
        return base * p.gamma ** it
    if policy == "inv":
        return base * (1 + p.gamma * it) ** (-p.power)
    if policy == "multistep":
        return base * p.gamma ** current_step
    if policy == "poly":
        return base * (1 - it / p.max_iter) ** p.power
    if policy == "sigmoid":
        return base / (1 + math.exp(-p.gamma * (it - p.stepsize)))
    if policy == "plateau":
        return base * p.gamma ** reductions
    raise VggcaffeError(f"unknown lr_policy '{policy}'; known: {', '.join(LR_POLICIES)}")


class Plateau:
    """The paper's schedule: divide the rate when the validation accuracy stops improving."""

    def __init__(self, patience, max_reductions, threshold):
        self.patience, self.max_reductions, self.threshold = patience, max_reductions, threshold
        self.best, self.wait, self.reductions = None, 0, 0

    def observe(self, value):
        """Record one test score; True when this observation reduced the rate."""
        if self.best is None or value > self.best + self.threshold:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait >= self.patience and self.reductions < self.max_reductions:
            self.reductions += 1
            self.wait = 0
            return True
        return False


def _check_settings(p):
    """Raise on solver settings that would otherwise fail only later in training; returns
    the solver type."""
    kind = update_rules.check(p)
    if p.lr_policy not in LR_POLICIES:
        raise VggcaffeError(f"unknown lr_policy '{p.lr_policy}'; known: {', '.join(LR_POLICIES)}")
    if p.lr_policy == "step" and p.stepsize <= 0:
        raise VggcaffeError("lr_policy 'step' needs a positive stepsize")
    if p.regularization_type not in ("L1", "L2"):
        raise VggcaffeError(f"unknown regularization_type '{p.regularization_type}'; use L1 or L2")
    for field in ("snapshot", "display", "test_interval", "average_loss", "iter_size", "max_iter"):
        if getattr(p, field) < 0:
            raise VggcaffeError(f"{field} must not be negative, got {getattr(p, field)}")
    return kind


class SGDSolver:
    """pycaffe's SGDSolver: `.net`, `.test_nets`, `.step(n)`, `.solve()`, `.snapshot()`, `.restore()`.
    `solver`: a solver prototxt path or a SolverParameter (`source`: the file it was read from)."""

    def __init__(self, solver, dtype=np.float32, comm=None, level=0, stages=(), source=None):
        self.param = read_solver(solver) if isinstance(solver, (str, Path)) else solver
        p = self.param
        try:
            self.kind = _check_settings(p)
        except VggcaffeError as e:
            raise VggcaffeError(f"{solver if isinstance(solver, (str, Path)) else source or 'solver'}: {e}") from None
        self.comm = comm
        rank, size = (comm.rank, comm.size) if comm else (0, 1)
        seed = p.random_seed if p.random_seed >= 0 else None
        if comm:
            seed = comm.bcast_seed(seed)
        self.seed = seed
        self.can_snapshot = check_snapshot_settings(p, probe=rank == 0)
        if not self.can_snapshot and p.snapshot_after_train:
            log("Warning: the solver has no snapshot_prefix; no snapshot will be written", root=rank == 0)
        train_source, test_sources = self._net_sources()
        if len(p.test_iter) != len(test_sources):
            raise VggcaffeError(f"solver gives {len(p.test_iter)} test_iter values for {len(test_sources)} test nets")
        if p.test_state and len(p.test_state) != len(test_sources):
            raise VggcaffeError(f"solver gives {len(p.test_state)} test_state values for {len(test_sources)} test nets")
        train_state = _with_cli_state(p.train_state, level, stages)
        if comm:
            train_source = comm.local_batch(p, train_source, train_state)
        self.net = Net(train_source, phase="TRAIN", dtype=dtype, seed=seed, rank=rank, state=train_state)
        self.test_nets = []
        if rank == 0:
            for i, src in enumerate(test_sources):
                state = p.test_state[i] if p.test_state else caffe_pb2.NetState()
                net = Net(src, phase="TEST", dtype=dtype, seed=seed, state=state)
                net.share_with(self.net)
                self.test_nets.append(net)
        if comm:
            comm.setup(self)
        xp = backend.array_module(self.net.learnable_params[0].data) if self.net.learnable_params else np
        self.history = [xp.zeros_like(b.data) for _ in range(update_rules.HISTORIES[self.kind])
                        for b in self.net.learnable_params]
        self._gpu_update = None
        if backend.gpu_mode():
            from .gpu import setup_solver
            fused = setup_solver(self)
            self._gpu_update = fused if self.kind == "SGD" else None
        else:
            for net in [self.net] + self.test_nets:
                cpu.prepare_net(net)
        self.iter, self.current_step = 0, 0
        self.plateau = Plateau(p.plateau_patience, p.plateau_max_reductions, p.plateau_threshold)
        self.losses = deque(maxlen=max(1, p.average_loss))
        self.last_test = []
        self._stop_requested = False

    @property
    def is_root(self):
        return self.comm is None or self.comm.rank == 0

    def _net_sources(self):
        """(train net, [test nets]) as paths or NetParameters, by Caffe's precedence."""
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(given) != 1:
            raise VggcaffeError("solver must give exactly one of net, net_param, train_net, train_net_param"
                                + (f" (it gives {', '.join(given)})" if given else ""))
        train = getattr(p, given[0])
        tests = list(p.test_net) + list(p.test_net_param)
        if not tests and given[0] in ("net", "net_param"):
            tests = [train] * len(p.test_iter)
        return train, tests

    # ------------------------------------------------------------ one iteration
    def learning_rate(self):
        p = self.param
        if p.lr_policy == "multistep":
            while self.current_step < len(p.stepvalue) and self.iter >= p.stepvalue[self.current_step]:
                self.current_step += 1
        return learning_rate(p, self.iter, self.current_step, self.plateau.reductions)

    def forward_backward(self, average=False):
        """The gradients of one step (iter_size forward/backward passes) in the param diffs;
        returns the loss. `average`: under MPI, the gradients and loss are then averaged over
        the ranks (layer by layer during the last backward where the Communicator does so)."""
        self.net.clear_param_diffs()
        loss, iter_size = 0.0, max(1, self.param.iter_size)
        for k in range(iter_size):
            if average and self.comm and k == iter_size - 1:
                self.comm.reduce_during_backward(self.net)
            loss += self.net.forward_backward()
        loss /= iter_size
        if average and self.comm:
            loss = self.comm.allreduce_gradients(self.net.learnable_params, loss)
        return loss

    def apply_update(self, rate=None):
        """One SGD update from the param diffs, at `rate` (default: the current learning rate)."""
        p = self.param
        rate = self.learning_rate() if rate is None else rate
        params = self.net.learnable_params
        if p.clip_gradients >= 0:
            norm = math.sqrt(sum(float((b.diff.astype(np.float64) ** 2).sum()) for b in params))
            if norm > p.clip_gradients:
                log(f"Gradient clipping: scaling down gradients (L2 norm {norm:g} > {p.clip_gradients:g}) "
                    f"by scale factor {p.clip_gradients / norm:g}", root=self.is_root)
                for b in params:
                    b.diff *= p.clip_gradients / norm
        if self._gpu_update and self._gpu_update.applies(params, self.history):
            self._gpu_update(params, self.history, [rate * m for m in self.net.lr_mults],
                             [p.weight_decay * m for m in self.net.decay_mults], p.momentum,
                             max(1, p.iter_size), p.regularization_type == "L1")
            return
        xp = backend.array_module(params[0].data) if params else np
        n = len(params)
        histories = [self.history[i::n] for i in range(n)]        # each param's history arrays
        # Cache-sized pieces of every param, shared out over the cores by size (whole
        # params would leave a core idle: VGG's last convolutions hold most of the weights).
        pieces = [(arrays, rate * lr_mult, p.weight_decay * decay_mult)
                  for blob, hist, lr_mult, decay_mult in zip(params, histories, self.net.lr_mults,
                                                             self.net.decay_mults)
                  for arrays in _pieces(xp, blob.data, blob.diff, *hist)]
        rule = update_rules.RULES[self.kind]

        def update(i0, i1):
            for (data, diff, *hist), piece_rate, decay in pieces[i0:i1]:
                self._update_piece(xp, rule, data, diff, hist, piece_rate, decay)
        over_items(xp, update, [arrays[0].size for arrays, _, _ in pieces])

    def _update_piece(self, xp, rule, data, diff, hist, rate, decay):
        """Caffe's step on (a piece of) one param: diff = diff / iter_size + decay·(data, or
        sign(data) for L1); then the type's rule (SGD: history = momentum·history +
        rate·diff) gives the step, and data -= step. With a scratch temporary of the thread."""
        p = self.param
        tmp = scratch(xp, "update", data.shape, data.dtype)
        if p.iter_size > 1:
            diff /= p.iter_size
        if decay:
            xp.multiply(data if p.regularization_type == "L2" else xp.sign(data, out=tmp), decay, out=tmp)
            diff += tmp
        data -= rule(xp, diff, hist, rate, p, self.iter, tmp)

    def step(self, iters):
        """Run `iters` iterations (tests, display and snapshots as configured); as in Caffe,
        the displayed loss is smoothed over the iterations of this call only."""
        p = self.param
        self.losses.clear()
        stop_at = self.iter + iters
        start_time, start_iter = time.time(), self.iter
        bar = progress(iters, self.is_root)
        while self.iter < stop_at and not self._stop_requested:
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self.test_all()
            loss = self.forward_backward(average=True)
            if not math.isfinite(loss):
                raise VggcaffeError(f"loss is {loss} at iteration {self.iter}; stopping (snapshots hold finite "
                                    f"weights only, but the last may be past the divergence: resume from an "
                                    f"earlier one with a lower base_lr or clip_gradients)")
            self.losses.append(loss)
            rate = self.learning_rate()
            if p.display and self.iter % p.display == 0:
                elapsed = time.time() - start_time
                speed = (self.iter - start_iter) / elapsed if elapsed > 0 else 0.0
                self._display(speed, rate)
            self.apply_update(rate)
            self.iter += 1
            bar.update(1)
            if p.snapshot and self.iter % p.snapshot == 0:
                self.snapshot()
        bar.close()

    def _display(self, speed, rate):
        smoothed = sum(self.losses) / len(self.losses)
        per = self.param.display / speed if speed else 0.0
        log(f"Iteration {self.iter} ({speed:.4g} iter/s, {per:.4g}s/{self.param.display} iters), "
            f"loss = {smoothed:.6g}", root=self.is_root)
        outputs = self._outputs(self.net)
        if self.comm:
            means = self.comm.mean([value for _, _, value in outputs])
            outputs = [(name, w, m) for (name, w, _), m in zip(outputs, means)]
        for k, (name, w, value) in enumerate(outputs):
            suffix = f" (* {w:g} = {w * value:.6g} loss)" if w else ""
            log(f"    Train net output #{k}: {name} = {value:.6g}{suffix}", root=self.is_root)
        log(f"Iteration {self.iter}, lr = {rate:.6g}", root=self.is_root)

    @staticmethod
    def _outputs(net):
        """(name, loss weight, value) of every element of every output blob, as Caffe numbers
        its output lines (a blob of several values, e.g. per-class accuracies, gives several)."""
        return [(name, net.blob_loss_weights.get(name, 0.0), float(v))
                for name in net.outputs for v in backend.to_numpy(net.blobs[name].data).ravel()]

    # ------------------------------------------------------------ testing
    def test_all(self):
        self.last_test = []
        for i, net in enumerate(self.test_nets):
            self.last_test.append(self.test(i, net))
        if self.last_test and self.param.lr_policy == "plateau":
            self._observe_plateau(self.last_test[0])
        if self.comm:       # only rank 0 tests; every rank follows its schedule
            pl = self.plateau
            pl.best, pl.wait, pl.reductions = self.comm.bcast_object((pl.best, pl.wait, pl.reductions))

    def test(self, index, net):
        log(f"Iteration {self.iter}, Testing net (#{index})", root=self.is_root)
        n = self.param.test_iter[index]
        if n < 1:
            return []
        outputs, sums, loss = [], 0.0, 0.0
        for _ in range(n):
            loss += net.forward_loss()
            outputs = self._outputs(net)
            sums = sums + np.array([value for _, _, value in outputs])
        results = []
        if self.param.test_compute_loss:
            log(f"Test loss: {loss / n:.6g}", root=self.is_root)
        for k, ((name, w, _), total) in enumerate(zip(outputs, sums)):
            value = float(total) / n
            suffix = f" (* {w:g} = {w * value:.6g} loss)" if w else ""
            log(f"    Test net output #{k}: {name} = {value:.6g}{suffix}", root=self.is_root)
            results.append((name, value))
        return results

    def _observe_plateau(self, results):
        wanted = self.param.plateau_metric
        if wanted:
            match = [v for n, v in results if n == wanted]
        else:
            match = [v for n, v in results if n == "accuracy"] or [v for n, v in results if n.startswith("accuracy")]
        if not match:
            raise VggcaffeError(f"lr_policy 'plateau' watches test output '{wanted or 'accuracy'}', "
                                f"but the test net outputs {[n for n, _ in results]}")
        if self.plateau.observe(match[0]):
            log(f"Plateau: no improvement for {self.plateau.patience} test(s); lr reduced "
                f"({self.plateau.reductions}/{self.plateau.max_reductions})", root=self.is_root)

    # ------------------------------------------------------------ driving
    def solve(self, resume_file=None):
        """Train to max_iter; Ctrl-C snapshots then returns. Returns True when max_iter was reached."""
        p = self.param
        if resume_file:
            self.restore(resume_file)
        log(f"Solving {self.net.name}", root=self.is_root)
        log(f"Learning Rate Policy: {p.lr_policy}", root=self.is_root)
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.step(p.max_iter - self.iter)
        finally:
            signal.signal(signal.SIGINT, previous)
        if self._stop_requested:
            if self.can_snapshot:
                self.snapshot()
            written = "snapshot written" if self.can_snapshot else "no snapshot_prefix, no snapshot"
            log(f"Optimization stopped early (Ctrl-C); {written}.", root=self.is_root)
            return False
        if p.snapshot_after_train and self.can_snapshot and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_loss()
            self.losses.append(self.comm.mean([loss])[0] if self.comm else loss)
            log(f"Iteration {self.iter}, loss = {sum(self.losses) / len(self.losses):.6g}", root=self.is_root)
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log("Optimization Done.", root=self.is_root)
        return True

    def _on_sigint(self, signum, frame):
        # First Ctrl-C: finish this iteration, snapshot, stop. Second: stop now.
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def snapshot(self):
        """Write <prefix>_iter_<N>.npz (or .caffemodel) and .solverstate, atomically."""
        if not self.is_root:
            return None
        bad = [name for name, blob in zip(self.net.param_names, self.net.learnable_params)
               if not bool(backend.array_module(blob.data).isfinite(blob.data).all())]
        if bad:
            raise VggcaffeError(f"the weights hold NaN or Inf at iteration {self.iter} ({', '.join(bad[:4])}"
                                f"{'...' if len(bad) > 4 else ''}): training diverged; no snapshot written over "
                                f"the last good one (lower base_lr, or clip_gradients)")
        paths = write_snapshot(self)
        log(f"Snapshotting to {paths[0]}", root=True)
        log(f"Snapshotting solver state to {paths[1]}", root=True)
        return paths

    def restore(self, path):
        restore_state(self, path)
        if self.comm:
            self.comm.broadcast_params(self.net.learnable_params + self.history)
            self.comm.decorrelate_rngs(self.net)
        log(f"Restored solver state from {path} at iteration {self.iter}", root=self.is_root)


def _with_cli_state(state, level, stages):
    """A solver's train_state with the command line's --level and --stage merged in (as
    `caffe train -level -stage` does; test nets keep their test_state, as in Caffe)."""
    out = caffe_pb2.NetState()
    out.CopyFrom(state)
    if level:
        out.level = level
    out.stage.extend(stages)
    return out


def _pieces(xp, *arrays, size=1 << 18):
    """Matching pieces of `size` elements of the arrays (1-D views of their memory, in
    memory order) when they share one layout and each is one block, so the several
    passes of an update mostly find a piece in cache; otherwise the arrays themselves,
    whole. 2^18 (1 MB of float32) measured fastest on the demo net's update with the
    history coming from memory, as in training: 3.4 ms against 6.4 for 2^15 and 3.7
    for whole arrays."""
    if xp is np and len({(a.shape, a.strides) for a in arrays}) == 1:
        flats = [a.ravel(order="K") for a in arrays]
        if all(np.may_share_memory(f, a) for f, a in zip(flats, arrays)):
            return [[f[i:i + size] for f in flats] for i in range(0, flats[0].size, size)]
    return [arrays]
