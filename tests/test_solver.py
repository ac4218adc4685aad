"""SGD solver against closed-form updates, lr policies, plateau schedule, snapshots and resume."""
import math
import os

import numpy as np
import pytest

from vggcaffe.errors import VggcaffeError
from vggcaffe.layers import Layer, register
from vggcaffe.proto import caffe_pb2
from vggcaffe.prototxt import parse_text
from vggcaffe.solver import Plateau, SGDSolver, learning_rate

RS = np.random.default_rng(0)
X = RS.standard_normal((12, 3))
Y = RS.standard_normal((12, 1))


@register("TestFeed")
class FeedLayer(Layer):
    """Yields consecutive batches of the module's X, Y (wrapping), like a data layer."""
    exact_num_bottom = 0
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        self.batch = int(self.param.name.split("_")[1])
        self.pos = 0

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, 3)
        top[1].reshape(self.batch, 1)

    def forward(self, bottom, top):
        idx = (self.pos + np.arange(self.batch)) % len(X)
        top[0].data[...] = X[idx]
        top[1].data[...] = Y[idx]
        self.pos += self.batch

    def state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


def net_text(batch):
    return f"""
    layer {{ name: "feed_{batch}" type: "TestFeed" top: "x" top: "y" }}
    layer {{ name: "fc" type: "InnerProduct" bottom: "x" top: "p"
      param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
      inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 1 }}
                             bias_filler {{ type: "constant" value: 0.3 }} }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }}
    """


def make_solver(batch=4, extra="", dtype=np.float64):
    text = f"""
    net_param {{ {net_text(batch)} }}
    base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01 max_iter: 10 random_seed: 5
    snapshot_prefix: "snap" {extra}
    """
    return SGDSolver(parse_text(text, caffe_pb2.SolverParameter()), dtype=dtype)


F32 = lambda v: float(np.float32(v))  # noqa: E731  (solver fields are proto floats, as in Caffe)


def closed_form(w, b, iters, batch, iter_size, lr=F32(0.1), momentum=F32(0.9), wd=F32(0.01), reg="L2"):
    """Caffe's update by hand: decay on w only (decay_mult 0 for b), lr_mult 2 for b."""
    hw, hb, pos = np.zeros_like(w), np.zeros_like(b), 0
    for _ in range(iters):
        gw, gb = np.zeros_like(w), np.zeros_like(b)
        for _ in range(iter_size):
            idx = (pos + np.arange(batch)) % len(X)
            pos += batch
            r = X[idx] @ w.T + b - Y[idx]              # (batch, 1)
            gw += r.T @ X[idx] / batch
            gb += r.sum(0) / batch
        gw /= iter_size
        gb /= iter_size
        gw += wd * (w if reg == "L2" else np.sign(w))
        hw = momentum * hw + lr * gw
        hb = momentum * hb + 2 * lr * gb
        w, b = w - hw, b - hb
    return w, b


@pytest.mark.parametrize("iter_size,reg", [(1, "L2"), (3, "L2"), (2, "L1")])
def test_sgd_matches_closed_form(iter_size, reg):
    solver = make_solver(extra=f'iter_size: {iter_size} regularization_type: "{reg}"')
    w0, b0 = (blob.data.copy() for blob in solver.net.params["fc"])
    solver.step(7)
    w, b = closed_form(w0, b0, 7, 4, iter_size, reg=reg)
    np.testing.assert_allclose(solver.net.params["fc"][0].data, w, rtol=1e-12)
    np.testing.assert_allclose(solver.net.params["fc"][1].data, b, rtol=1e-12)


def test_gradient_clipping_scales_to_the_threshold():
    solver = make_solver(extra="clip_gradients: 0.01 momentum: 0 weight_decay: 0")
    w0 = solver.net.params["fc"][0].data.copy()
    b0 = solver.net.params["fc"][1].data.copy()
    solver.step(1)
    dw = (w0 - solver.net.params["fc"][0].data) / 0.1
    db = (b0 - solver.net.params["fc"][1].data) / 0.2
    assert math.sqrt((dw ** 2).sum() + (db ** 2).sum()) == pytest.approx(0.01)


@pytest.mark.parametrize("policy,extra,it,expected", [
    ("fixed", "", 1000, 0.01),
    ("step", "gamma: 0.1 stepsize: 100", 250, 0.01 * 0.1 ** 2),
    ("exp", "gamma: 0.99", 10, 0.01 * 0.99 ** 10),
    ("inv", "gamma: 0.001 power: 0.75", 500, 0.01 * (1 + 0.5) ** -0.75),
    ("poly", "power: 2 max_iter: 1000", 250, 0.01 * 0.75 ** 2),
    ("sigmoid", "gamma: 0.05 stepsize: 200", 250, 0.01 / (1 + math.exp(-0.05 * 50))),
])
def test_lr_policies(policy, extra, it, expected):
    p = parse_text(f'base_lr: 0.01 lr_policy: "{policy}" {extra}', caffe_pb2.SolverParameter())
    assert learning_rate(p, it) == pytest.approx(expected, rel=1e-6)


def test_multistep_advances_at_stepvalues():
    solver = make_solver(extra='lr_policy: "multistep" gamma: 0.5 stepvalue: 3 stepvalue: 5')
    solver.param.lr_policy = "multistep"
    rates = []
    for it in range(7):
        solver.iter = it
        rates.append(solver.learning_rate())
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_unknown_policy_is_an_error():
    with pytest.raises(VggcaffeError, match="unknown lr_policy 'cosine'"):
        make_solver(extra='lr_policy: "cosine"')


def test_plateau_reduces_after_patience_and_at_most_max():
    plateau = Plateau(patience=2, max_reductions=2, threshold=0.0)
    scores = [0.1, 0.2, 0.2, 0.19, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    reduced = [plateau.observe(s) for s in scores]
    assert reduced == [False, False, False, True, False, False, True, False, False, False, False]
    assert plateau.reductions == 2


def test_plateau_policy_in_solver_watches_test_accuracy():
    text = f"""
    net_param {{ {net_text(len(X))}
      layer {{ name: "accuracy" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "accuracy"
               loss_weight: 0 include {{ phase: TEST }} }} }}
    test_iter: 1 test_interval: 1 base_lr: 0.0 lr_policy: "plateau" gamma: 0.1 plateau_patience: 1
    momentum: 0 max_iter: 6 random_seed: 1
    """
    solver = SGDSolver(parse_text(text, caffe_pb2.SolverParameter()), dtype=np.float64)
    solver.step(5)
    # lr 0 keeps the weights, so the score never improves after the first test:
    # tests at iterations 1..4 each reduce once, up to plateau_max_reductions (3).
    assert solver.plateau.reductions == 3
    solver.param.base_lr = 1.0
    assert solver.learning_rate() == pytest.approx(1e-3)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    os.chdir(tmp_path)
    straight = make_solver(extra='lr_policy: "step" gamma: 0.5 stepsize: 3')
    straight.step(8)
    first = make_solver(extra='lr_policy: "step" gamma: 0.5 stepsize: 3')
    first.step(5)
    _, state = first.snapshot()
    resumed = make_solver(extra='lr_policy: "step" gamma: 0.5 stepsize: 3')
    resumed.restore(state)
    assert resumed.iter == 5
    resumed.step(3)
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_snapshot_is_atomic_when_a_write_dies(tmp_path, monkeypatch):
    os.chdir(tmp_path)
    solver = make_solver()
    solver.step(2)
    weights, state = solver.snapshot()
    before = weights.read_bytes()
    solver.iter = 2  # overwrite the same files
    solver.step(1)
    solver.iter = 2

    def dying_savez(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        solver.snapshot()
    assert weights.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_snapshot_with_a_caffemodel_format(tmp_path):
    os.chdir(tmp_path)
    solver = make_solver(extra="snapshot_format: BINARYPROTO")
    solver.step(1)
    weights, state = solver.snapshot()
    assert weights.name == "snap_iter_1.caffemodel" and state.name == "snap_iter_1.solverstate"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_solverstate_file_is_protobufs_own_bytes(tmp_path, dtype):
    """The state is written from the history arrays' bytes; protobuf's own serializer, fed
    the same fields, writes the same file."""
    import json
    from tests.test_weights import reference_blob
    os.chdir(tmp_path)
    solver = make_solver(extra='lr_policy: "multistep" stepvalue: 1 gamma: 0.5', dtype=dtype)
    solver.plateau.best = 0.25
    solver.step(2)
    _, path = solver.snapshot()
    written = path.read_bytes()
    state = caffe_pb2.SolverState.FromString(written)
    assert state.iter == 2 and state.current_step == 1 and state.plateau_best == 0.25 and json.loads(state.rng_state)
    expected = caffe_pb2.SolverState(iter=state.iter, learned_net=state.learned_net, current_step=state.current_step,
                                     plateau_best=state.plateau_best, plateau_wait=state.plateau_wait,
                                     plateau_reductions=state.plateau_reductions, rng_state=state.rng_state)
    for hist in solver.history:
        expected.history.add().CopyFrom(reference_blob(hist))
    assert written == expected.SerializeToString()


def test_nan_loss_stops_with_a_message():
    solver = make_solver(extra="base_lr: 1e30")
    with pytest.raises(VggcaffeError, match=r"loss is (nan|inf) at iteration \d+"):
        solver.step(10)


STAGED = ('layer { name: "val_only" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "val_only" '
          'include { stage: "val" } }')


def staged_solver(solver_extra="", net_extra=""):
    text = f"""net_param {{ {net_extra} {net_text(4)} {STAGED} }} base_lr: 0.1 lr_policy: "fixed" max_iter: 1
    test_iter: 1 test_interval: 100 snapshot_after_train: false {solver_extra}"""
    return SGDSolver(parse_text(text, caffe_pb2.SolverParameter()))


def test_train_state_test_state_and_the_nets_own_state_choose_layers_as_in_caffe():
    def has(net):
        return "val_only" in net.layer_dict
    s = staged_solver()
    assert not has(s.net) and not has(s.test_nets[0])
    s = staged_solver('test_state { stage: "val" }')
    assert not has(s.net) and has(s.test_nets[0])
    s = staged_solver('train_state { stage: "val" }')
    assert has(s.net) and not has(s.test_nets[0])
    s = staged_solver(net_extra='state { stage: "val" }')            # NetParameter.state, under both
    assert has(s.net) and has(s.test_nets[0])
    with pytest.raises(VggcaffeError, match="2 test_state values for 1 test nets"):
        staged_solver('test_state { stage: "val" } test_state { }')
    text = f"""net_param {{ {net_text(4)} {STAGED} }} base_lr: 0.1 lr_policy: "fixed" max_iter: 1
    test_iter: 1 test_interval: 100 snapshot_after_train: false"""
    s = SGDSolver(parse_text(text, caffe_pb2.SolverParameter()), stages=["val"])    # `caffe train -stage val`
    assert has(s.net) and not has(s.test_nets[0])                                   # the train net's only


def test_every_element_of_an_output_blob_gets_its_own_numbered_line(capsys):
    side = ('layer { name: "side" type: "InnerProduct" bottom: "x" top: "side" '
            'inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }')
    text = f"""net_param {{ {net_text(2)} {side} }} base_lr: 0.1 lr_policy: "fixed" max_iter: 1 display: 1
    test_iter: 2 test_interval: 100 snapshot_after_train: false"""
    solver = SGDSolver(parse_text(text, caffe_pb2.SolverParameter()), dtype=np.float64)
    results = solver.test(0, solver.test_nets[0])
    # outputs in name order (Caffe's), "side" (2, 2) as 4 values: the mean over 2 test batches
    assert [name for name, _ in results] == ["loss"] + ["side"] * 4
    batches = [X[0:2], X[2:4]]
    expected = np.mean([b.sum(axis=1).repeat(2) for b in batches], axis=0)      # weights all 1, bias 0
    np.testing.assert_allclose([v for _, v in results[1:]], expected)
    out = capsys.readouterr().err
    assert "Test net output #4: side = " in out and "Test net output #5" not in out
    solver.step(1)
    assert "Train net output #4: side = " in capsys.readouterr().err


def test_step_smooths_the_loss_over_its_own_iterations_and_apply_update_takes_the_current_rate():
    a = make_solver(extra="average_loss: 10")
    a.step(3)
    assert len(a.losses) == 3
    a.step(2)
    assert len(a.losses) == 2                                   # Caffe's Step clears losses_
    c, d = make_solver(extra='lr_policy: "step" stepsize: 1 gamma: 0.5'), make_solver()
    c.iter = 3                                                  # rate 0.1 * 0.5^3
    for s in (c, d):
        s.forward_backward()
    c.apply_update()                                            # pycaffe's apply_update(): no argument
    d.apply_update(d.learning_rate() * 0.125)
    np.testing.assert_array_equal(c.net.params["fc"][0].data, d.net.params["fc"][0].data)


def solver_text(extra):
    return f'net_param {{ {net_text(4)} }} base_lr: 0.1 lr_policy: "fixed" max_iter: 2 {extra}'


@pytest.mark.parametrize("extra, message", [
    ('snapshot_prefix: "s" snapshot_format: HDF5', "HDF5 is not supported"),
    ("snapshot: 5", "snapshots every 5 iterations but has no snapshot_prefix"),
    ('snapshot_prefix: "{file}/s"', "cannot write to snapshot_prefix"),
])
def test_snapshot_settings_are_checked_before_training(tmp_path, extra, message):
    (tmp_path / "file").write_text("")
    text = solver_text(extra.replace("{file}", str(tmp_path / "file")))
    with pytest.raises(VggcaffeError, match=message):
        SGDSolver(parse_text(text, caffe_pb2.SolverParameter()))


def test_a_solver_built_without_prefix_trains_and_writes_nothing(tmp_path, capsys):
    os.chdir(tmp_path)
    solver = SGDSolver(parse_text(solver_text(""), caffe_pb2.SolverParameter()))
    assert "no snapshot will be written" in capsys.readouterr().err
    assert solver.solve() and not list(tmp_path.iterdir())


def test_solver_files_get_caffes_default_snapshot_prefix(tmp_path):
    from vggcaffe.prototxt import read_solver
    (tmp_path / "my_solver.prototxt").write_text(solver_text(""))
    assert read_solver(tmp_path / "my_solver.prototxt").snapshot_prefix == str(tmp_path / "my_solver")
    (tmp_path / "snaps").mkdir()
    (tmp_path / "dir_solver.prototxt").write_text(solver_text(f'snapshot_prefix: "{tmp_path / "snaps"}"'))
    assert read_solver(tmp_path / "dir_solver.prototxt").snapshot_prefix == str(tmp_path / "snaps" / "dir_solver")


def test_a_diverged_update_is_not_snapshotted_over_the_last_good_one(tmp_path):
    os.chdir(tmp_path)
    solver = make_solver(extra="base_lr: 1e30 snapshot: 1")
    with pytest.raises(VggcaffeError, match="NaN or Inf|loss is"):
        solver.step(10)
    for path in tmp_path.glob("snap_iter_*.npz"):
        with np.load(path) as f:
            assert all(np.isfinite(f[k]).all() for k in f.files)


@pytest.mark.parametrize("change, message", [
    (('lr_policy: "fixed"', 'lr_policy: "step"'), "lr_policy 'step' needs a positive stepsize"),
    (("max_iter: 2", 'max_iter: 2 regularization_type: "L3"'), "unknown regularization_type 'L3'"),
    (("max_iter: 2", "max_iter: 2 snapshot: -1"), "snapshot must not be negative"),
])
def test_settings_that_would_fail_later_are_errors_naming_the_solver_file(tmp_path, change, message):
    path = tmp_path / "s.prototxt"
    path.write_text(solver_text("").replace(*change))
    with pytest.raises(VggcaffeError, match=f"s.prototxt: {message}"):
        SGDSolver(str(path))


def test_damaged_solver_states_are_one_line_errors(tmp_path):
    os.chdir(tmp_path)
    solver = make_solver()
    solver.step(1)
    weights, state = solver.snapshot()
    with pytest.raises(VggcaffeError, match="cannot read the solver state"):
        make_solver().restore(tmp_path)
    s = caffe_pb2.SolverState()
    s.ParseFromString(state.read_bytes())
    s.rng_state = "{not json"
    state.write_bytes(s.SerializeToString())
    with pytest.raises(VggcaffeError, match="random generator states are damaged"):
        make_solver().restore(state)


def caffe_step(kind, w, g, hist, rate, t, momentum=0.9, momentum2=0.999, rms_decay=0.98, delta=1e-8):
    """One update of Caffe's solver `kind`, written from its C++ (ComputeUpdateValue + Update)."""
    h, h2 = hist
    if kind == "SGD":
        h[:] = momentum * h + rate * g
        step = h.copy()
    elif kind == "Nesterov":
        previous = h.copy()
        h[:] = momentum * h + rate * g
        step = (1 + momentum) * h - momentum * previous
    elif kind == "AdaGrad":
        h += g ** 2
        step = rate * g / (np.sqrt(h) + delta)
    elif kind == "RMSProp":
        h[:] = rms_decay * h + (1 - rms_decay) * g ** 2
        step = rate * g / (np.sqrt(h) + delta)
    elif kind == "AdaDelta":
        h[:] = momentum * h + (1 - momentum) * g ** 2
        update = g * np.sqrt((h2 + delta) / (h + delta))
        h2[:] = momentum * h2 + (1 - momentum) * update ** 2
        step = rate * update
    else:                                                      # Adam
        h[:] = momentum * h + (1 - momentum) * g
        h2[:] = momentum2 * h2 + (1 - momentum2) * g ** 2
        correction = np.sqrt(1 - momentum2 ** (t + 1)) / (1 - momentum ** (t + 1))
        step = rate * correction * h / (np.sqrt(h2) + delta)
    return w - step


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_solver_types_follow_caffes_update_rules(kind, tmp_path):
    momentum = 0 if kind in ("AdaGrad", "RMSProp") else 0.9
    text = f"""net_param {{ {net_text(4)} }} type: "{kind}" base_lr: 0.1 lr_policy: "fixed" max_iter: 10
    momentum: {momentum} weight_decay: 0.01 momentum2: 0.999 rms_decay: 0.98 delta: 1e-8 random_seed: 5
    snapshot_prefix: "{tmp_path}/s" """
    solver = SGDSolver(parse_text(text, caffe_pb2.SolverParameter()), dtype=np.float64)
    params = solver.net.learnable_params
    assert len(solver.history) == (2 if kind in ("AdaDelta", "Adam") else 1) * len(params)
    hist = [[np.zeros_like(b.data), np.zeros_like(b.data)] for b in params]
    lr_mult, decay_mult = [1, 2], [1, 0]                          # fc's weight and bias in net_text
    for t in range(4):
        w = [b.data.copy() for b in params]
        solver.forward_backward()
        g = [b.diff + F32(0.01) * d * x for b, d, x in zip(params, decay_mult, w)]
        solver.apply_update()
        solver.iter += 1
        for k, b in enumerate(params):
            expected = caffe_step(kind, w[k], g[k], hist[k], F32(0.1) * lr_mult[k], t, momentum=F32(momentum),
                                  momentum2=F32(0.999), rms_decay=F32(0.98), delta=F32(1e-8))
            np.testing.assert_allclose(b.data, expected, rtol=1e-12, atol=1e-15)
    weights, state = solver.snapshot()                          # all histories travel in the .solverstate
    again = SGDSolver(parse_text(text, caffe_pb2.SolverParameter()), dtype=np.float64)
    again.restore(state)
    for a, b in zip(again.history, solver.history):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("extra, message", [
    ('type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" rms_decay: 1', r"rms_decay should lie in \[0, 1\)"),
    ('type: "Adamax"', "unknown solver type 'Adamax'; known: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam"),
])
def test_solver_type_settings_are_checked(extra, message):
    with pytest.raises(VggcaffeError, match=message):
        SGDSolver(parse_text(solver_text(extra), caffe_pb2.SolverParameter()))


def test_a_folder_prefix_names_snapshots_the_same_before_and_after_the_folder_exists(tmp_path):
    from vggcaffe.prototxt import read_solver
    path = tmp_path / "my_solver.prototxt"
    path.write_text(solver_text(f'snapshot_prefix: "{tmp_path / "out"}/"'))
    before = read_solver(path).snapshot_prefix
    SGDSolver(str(path))                                   # the probe makes no folder
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    assert read_solver(path).snapshot_prefix == before == str(tmp_path / "out" / "my_solver")
