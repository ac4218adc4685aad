"""Net: a prototxt built into layers and blobs for one phase, with forward and backward.

Caffe's Net::Init, step by step: filter layers by the NetState's include /
exclude rules and insert hidden Split layers where a blob feeds several
consumers, so gradients are summed (both in vggcaffe/graph.py); wire bottoms
and tops (a top named like its bottom is in place); set up params with
lr_mult/decay_mult and sharing by name; decide which layers need backward
(loss weights, propagate_down, force_backward). The Python API mirrors
pycaffe: net.blobs, net.params, net.forward(**inputs), net.backward(**diffs),
net.save(path), net.copy_from(path), net.set_input_arrays(data, labels).
"""
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import backend
from . import layers as layer_registry  # importing it registers every layer type
from .blob import Blob
from .errors import VggcaffeError
from .graph import PHASES, available_blobs, filter_net, insert_splits, net_state
from .proto import caffe_pb2
from .prototxt import layer_lines, read_text, upgrade_net


class Net:
    """A network for one phase. `model` is a prototxt path or a NetParameter. As in pycaffe,
    Net(model, phase, weights=...) and the older Net(model, weights, phase) both work.
    `state`: a NetState merged over the net's own (see net_state), as a solver's
    train_state / test_state; otherwise `level` and `stages` as in pycaffe. `source`: the
    prototxt a NetParameter `model` was made from, named with its line in errors."""

    def __init__(self, model, phase="TEST", weights=None, level=0, stages=(), dtype=np.float32,
                 seed=None, rank=0, state=None, source=None):
        if _is_phase(weights) and not _is_phase(phase):
            phase, weights = weights, phase
        self.phase = phase.upper() if isinstance(phase, str) else (
            caffe_pb2.Phase.Name(phase) if _is_phase(phase) else repr(phase))
        if self.phase not in PHASES:
            raise VggcaffeError(f"phase must be TRAIN or TEST, got {phase!r}")
        self.dtype = np.dtype(dtype)
        self.source, self._lines = "<NetParameter>", {}
        if isinstance(model, (str, Path)):
            param, text = read_text(model, caffe_pb2.NetParameter())
            self.source, self._lines = str(model), layer_lines(text)
            param = upgrade_net(param)
        elif isinstance(model, caffe_pb2.NetParameter):
            param = upgrade_net(_copy(model))
            if isinstance(source, (str, Path)) and Path(source).is_file():
                self.source, self._lines = str(source), layer_lines(Path(source).read_text(errors="replace"))
        else:
            raise VggcaffeError(f"a net is a prototxt path or a NetParameter, not {type(model).__name__}")
        self.name = param.name
        self.param = filter_net(param, net_state(param, self.phase, state, level, stages))
        self._seed = np.random.SeedSequence(seed)
        self._rank = rank
        self.after_backward = []    # callables of a layer index, run after that layer's turn in backward
        self.data_slots = None      # shared activation memory of a forward-only net (memory.share_data)
        self._build(self.param)
        if weights:
            for path in str(weights).split(","):
                self.copy_from(path)

    # ------------------------------------------------------------ build
    def _where(self, layer_name):
        line = self._lines.get(layer_name)
        return f"{self.source}:{line}" if line else self.source

    def _default_loss(self, layer_param):
        cls = layer_registry.LAYER_TYPES.get(layer_param.type)
        return cls.default_loss_weight if cls else 0.0

    def _make_layer(self, lp, index):
        cls = layer_registry.LAYER_TYPES.get(lp.type)
        if cls is None:
            known = ", ".join(sorted(t for t in layer_registry.LAYER_TYPES if t != "Split"))
            raise VggcaffeError(f"{self._where(lp.name)}: layer '{lp.name}' has unknown type "
                                f"'{lp.type}'; known types: {known}")
        seed_ints = [int(x) for x in self._seed.generate_state(2)]
        rng = np.random.default_rng([*seed_ints, self._rank, index])
        layer = cls(lp, phase=self.phase, dtype=self.dtype, rng=rng)
        layer.order_seed = [*seed_ints, index]
        return layer

    def _build(self, param):
        split_param = insert_splits(param, self._default_loss)
        self.layers, self._bottoms, self._tops = [], [], []
        self._all_blobs = OrderedDict()
        self._layer_names = []
        self.loss_weights = {}
        self.blob_loss_weights = {}
        self.inputs = []
        for index, lp in enumerate(split_param.layer):
            layer = self._make_layer(lp, index)
            bottom = self._wire_bottoms(lp)
            top = self._wire_tops(lp, layer, bottom)
            try:
                layer.setup(bottom, top)
            except VggcaffeError as e:
                raise VggcaffeError(f"{self._where(lp.name)}: {e}") from None
            self.layers.append(layer)
            self._layer_names.append(lp.name)
            self._bottoms.append(bottom)
            self._tops.append(top)
            if lp.type == "Input":
                self.inputs.extend(lp.top)
            self._set_loss_weights(lp, layer, top)
        self.layer_dict = OrderedDict(zip(self._layer_names, self.layers))
        # each hidden Split top -> the blob it copies (net.blobs leaves the copies out)
        self._origin = {t: lp.bottom[0] for lp in split_param.layer if lp.type == "Split" for t in lp.top}
        self.blobs = OrderedDict((k, b) for k, b in self._all_blobs.items() if k not in self._origin)
        self.outputs = sorted(name for name in available_blobs(split_param) if name in self.blobs)
        self._top_names = [list(dict.fromkeys(self._origin.get(t, t) for t in lp.top)) for lp in split_param.layer]
        self._bottom_names = [[self._origin.get(b, b) for b in lp.bottom] for lp in split_param.layer]
        self._setup_params(split_param)
        self._setup_backward(split_param)

    def _wire_bottoms(self, lp):
        bottom = []
        for name in lp.bottom:
            if name not in self._all_blobs:
                raise VggcaffeError(f"{self._where(lp.name)}: layer '{lp.name}' takes bottom '{name}', "
                                    f"which no earlier layer produces")
            bottom.append(self._all_blobs[name])
        return bottom

    def _wire_tops(self, lp, layer, bottom):
        names = list(lp.top)
        if not names and layer.auto_top_blobs:
            names = [lp.name]
            lp.top.append(lp.name)
        top = []
        for i, name in enumerate(names):
            if i < len(lp.bottom) and lp.bottom[i] == name:
                top.append(bottom[i])
            elif name in self._all_blobs:
                raise VggcaffeError(f"{self._where(lp.name)}: top blob '{name}' of layer '{lp.name}' "
                                    f"is produced by multiple sources")
            else:
                blob = Blob((), dtype=self.dtype)
                self._all_blobs[name] = blob
                top.append(blob)
        return top

    def _set_loss_weights(self, lp, layer, top):
        weights = list(lp.loss_weight)
        if not weights and layer.default_loss_weight:
            weights = [layer.default_loss_weight]
        if len(weights) > len(top):
            raise VggcaffeError(f"{self._where(lp.name)}: layer '{lp.name}' gives {len(weights)} loss_weight "
                                f"values for {len(top)} tops")
        for i, w in enumerate(weights):
            if w != 0:
                self.loss_weights[(len(self.layers) - 1, i)] = float(w)
                self.blob_loss_weights[lp.top[i]] = float(w)

    def _setup_params(self, split_param):
        """Param specs, sharing by name, and the list of learnable (owner) params."""
        self.params = OrderedDict()
        self.learnable_params, self.lr_mults, self.decay_mults, self.param_names = [], [], [], []
        owners = {}
        for lp, layer in zip(split_param.layer, self.layers):
            if not layer.blobs:
                continue
            if len(lp.param) > len(layer.blobs):
                raise VggcaffeError(f"{self._where(lp.name)}: layer '{lp.name}' gives {len(lp.param)} param "
                                    f"specs but has {len(layer.blobs)} parameter blobs")
            for j in range(len(layer.blobs)):
                spec = lp.param[j] if j < len(lp.param) else caffe_pb2.ParamSpec()
                if spec.name and spec.name in owners:
                    self._share_param(lp, layer, j, spec, owners[spec.name])
                else:
                    if spec.name:
                        owners[spec.name] = (layer.blobs[j], spec, lp.name)
                    self.learnable_params.append(layer.blobs[j])
                    self.lr_mults.append(spec.lr_mult)
                    self.decay_mults.append(spec.decay_mult)
                    self.param_names.append(f"{lp.name}/{j}")
                layer.param_propagate_down[j] = spec.lr_mult != 0
            if lp.name in self.params:
                raise VggcaffeError(f"{self._where(lp.name)}: two layers with parameters are named '{lp.name}'; "
                                    f"weights are saved and loaded by layer name, so give each its own")
            self.params[lp.name] = layer.blobs

    def _share_param(self, lp, layer, j, spec, owner):
        blob, owner_spec, owner_layer = owner
        mine = layer.blobs[j]
        strict = owner_spec.share_mode == caffe_pb2.ParamSpec.STRICT and spec.share_mode == caffe_pb2.ParamSpec.STRICT
        if (strict and mine.shape != blob.shape) or mine.count != blob.count:
            raise VggcaffeError(f"layer '{lp.name}' shares param '{spec.name}' of layer '{owner_layer}' "
                                f"but shapes differ: {mine.shape} vs {blob.shape}")
        if spec.HasField("lr_mult") and spec.lr_mult != owner_spec.lr_mult:
            raise VggcaffeError(f"layer '{lp.name}': shared param '{spec.name}' has lr_mult {spec.lr_mult}, "
                                f"its owner '{owner_layer}' has {owner_spec.lr_mult}")
        if mine.shape == blob.shape:
            layer.blobs[j] = blob
        else:
            mine.data = blob.data.reshape(mine.shape)
            mine.diff = blob.diff.reshape(mine.shape)

    def _setup_backward(self, split_param):
        """Which layers and bottoms need backward (Caffe's need_backward analysis)."""
        force = split_param.force_backward
        blob_needs = {}
        self._need_backward, self._bottom_need = [], []
        for lp, layer, bottom in zip(split_param.layer, self.layers, self._bottoms):
            needs = any(layer.param_propagate_down) or any(blob_needs.get(n, False) for n in lp.bottom)
            needs = needs or (force and any(layer.allow_force_backward(i) for i in range(len(bottom))))
            bneed = []
            for i, name in enumerate(lp.bottom):
                need = (blob_needs.get(name, False) or force) and layer.allow_force_backward(i)
                if i < len(lp.propagate_down):
                    need = bool(lp.propagate_down[i])
                    if need and not layer.allow_force_backward(i):
                        raise VggcaffeError(f"{self._where(lp.name)}: layer '{lp.name}' cannot backpropagate to "
                                            f"its bottom '{self._origin.get(name, name)}' (propagate_down)")
                bneed.append(need)
            for name in lp.top:
                blob_needs[name] = needs
            self._need_backward.append(needs)
            self._bottom_need.append(bneed)
        under_loss = set()
        for li in reversed(range(len(self.layers))):
            lp = split_param.layer[li]
            contributes = any((li, t) in self.loss_weights for t in range(len(lp.top)))
            contributes = contributes or any(name in under_loss for name in lp.top)
            if not contributes and not force:
                self._need_backward[li] = False
                self._bottom_need[li] = [False] * len(lp.bottom)
            if self._need_backward[li]:
                under_loss.update(lp.bottom)
            else:
                self._bottom_need[li] = [False] * len(lp.bottom)

    # ------------------------------------------------------------ running
    def reshape(self):
        for layer, bottom, top in zip(self.layers, self._bottoms, self._tops):
            layer.reshape(bottom, top)
            if self.data_slots is not None:
                self.data_slots.place(top)

    def _forward_layer(self, i):
        layer, bottom, top = self.layers[i], self._bottoms[i], self._tops[i]
        layer.reshape(bottom, top)
        if self.data_slots is not None:
            self.data_slots.place(top)
        layer.forward(bottom, top)
        loss = 0.0
        for t, blob in enumerate(top):
            w = self.loss_weights.get((i, t))
            if w is not None:
                blob.diff[...] = w
                loss = loss + w * blob.data.sum(dtype=np.float64)    # on the GPU a device scalar: no sync
        return loss

    def _index(self, name, default):
        if name is None:
            return default
        if name not in self.layer_dict:
            raise VggcaffeError(f"net has no layer '{name}'")
        return self._layer_names.index(name)

    def forward_loss(self, start=None, end=None):
        """Run layers start..end (inclusive); returns the total weighted loss."""
        return self._read_loss(self._forward_range(start, end))

    def _forward_range(self, start=None, end=None):
        """forward_loss without reading the loss back (a device scalar on the GPU)."""
        lo, hi = self._index(start, 0), self._index(end, len(self.layers) - 1)
        return sum(self._forward_layer(i) for i in range(lo, hi + 1))

    def backward_all(self, start=None, end=None):
        """Backward through layers end..start that need it; after each layer's turn (run or
        not), the `after_backward` callables get its index (Caffe's add_after_backward)."""
        if self.data_slots is not None:
            raise VggcaffeError(f"net '{self.name}' runs forward only: its activations share memory "
                                f"(vggcaffe.memory.share_data), so backward has no intermediate data")
        lo, hi = self._index(start, 0), self._index(end, len(self.layers) - 1)
        for i in range(hi, lo - 1, -1):
            if self._need_backward[i]:
                self.layers[i].backward(self._tops[i], self._bottom_need[i], self._bottoms[i])
            for hook in self.after_backward:
                hook(i)

    def forward_backward(self):
        """Forward and backward; the loss is read back once backward is queued, so on the
        GPU the device does not wait for the host between the two."""
        loss = self._forward_range()
        self.backward_all()
        return self._read_loss(loss)

    def _read_loss(self, loss):
        """The loss as a float, read from the device (on the GPU) in one copy together with the
        layers' `deferred_check` flags; raises the first failed check."""
        checks = [layer.deferred_check for layer in self.layers if layer.deferred_check is not None]
        for layer in self.layers:
            layer.deferred_check = None
        if not checks:
            return float(loss)
        xp = backend.array_module(checks[0][0])
        values = backend.to_numpy(xp.stack([xp.asarray(loss, np.float64)] + [f.astype(np.float64) for f, _ in checks]))
        for flag, (_, message) in zip(values[1:], checks):
            if flag:
                raise VggcaffeError(message)
        return float(values[0])

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """pycaffe's Net.forward: set inputs, run, return {output: data}."""
        names = self.outputs if end is None else self._top_names[self._index(end, 0)]
        names = list(names) + [b for b in (blobs or []) if b not in names]
        if self.data_slots is not None:
            self._check_shared_forward(start, end, names)
        for name, value in inputs.items():
            if name not in self.inputs:
                raise VggcaffeError(f"'{name}' is not a net input; inputs are {self.inputs}")
            blob = self.blobs[name]
            try:
                value = blob._xp.asarray(value, dtype=self.dtype)
            except (TypeError, ValueError) as e:
                raise VggcaffeError(f"input '{name}' is not an array of numbers ({e})") from None
            if value.shape != blob.shape:
                if value.ndim != len(blob.shape):
                    raise VggcaffeError(f"input '{name}' has shape {value.shape}, but the net's '{name}' is "
                                        f"{len(blob.shape)}-D {blob.shape}; give a batch of that shape")
                blob.reshape(value.shape)
            blob.data[...] = value
        self.forward_loss(start, end)
        return {name: self.blobs[name].data for name in names}

    def _check_shared_forward(self, start, end, names):
        """A net whose activations share memory (share_data) runs from its first layer and
        hands back no blob that a later layer may have overwritten."""
        if self._index(start, 0) > 0:
            raise VggcaffeError(f"net '{self.name}' shares activation memory (vggcaffe.memory.share_data): "
                                f"forward must start at the first layer, not '{start}'")
        last = self._tops[self._index(end, len(self.layers) - 1)]
        shared = [name for name in names if name in self.blobs and id(self.blobs[name]) in self.data_slots.slot_of
                  and not any(self.blobs[name] is t for t in last)]
        if shared:
            raise VggcaffeError(f"net '{self.name}' shares activation memory (vggcaffe.memory.share_data): "
                                f"blob(s) {', '.join(shared)} are overwritten by later layers; "
                                f"name them in share_data(net, keep=[...])")

    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """pycaffe's Net.backward: set output diffs, run, return {input: diff}."""
        for name, value in top_diffs.items():
            if name not in self.outputs:
                raise VggcaffeError(f"'{name}' is not a net output; outputs are {self.outputs}")
            blob = self.blobs[name]
            value = blob._xp.asarray(value, dtype=self.dtype)
            if value.shape != blob.shape:
                raise VggcaffeError(f"diff for '{name}' has shape {value.shape}, blob has {blob.shape}")
            blob.diff[...] = value
        self.backward_all(start, end)
        names = list(self.inputs) + [b for b in (diffs or []) if b not in self.inputs]
        return {name: self.blobs[name].diff for name in names}

    @property
    def top_names(self):
        """pycaffe's: {layer name: its top blob names} (names of net.blobs; the hidden Split
        layers, whose tops are copies of one blob, are left out)."""
        return OrderedDict((n, t) for n, t, lay in zip(self._layer_names, self._top_names, self.layers)
                           if lay.type != "Split")

    @property
    def bottom_names(self):
        """pycaffe's: {layer name: its bottom blob names} (names of net.blobs, Splits left out)."""
        return OrderedDict((n, b) for n, b, lay in zip(self._layer_names, self._bottom_names, self.layers)
                           if lay.type != "Split")

    def forward_all(self, blobs=None, **inputs):
        """pycaffe's: forward over inputs of any number of samples, in batches of the input
        blobs' batch size; returns {output (and `blobs`): the outputs of every sample}."""
        if not inputs:
            raise VggcaffeError("forward_all needs the inputs, e.g. forward_all(data=images)")
        counts = {len(v) for v in inputs.values()}
        if len(counts) != 1:
            raise VggcaffeError(f"forward_all inputs have different sample counts: {sorted(counts)}")
        n, first = counts.pop(), next(iter(inputs))
        if first not in self.inputs:
            raise VggcaffeError(f"'{first}' is not a net input; inputs are {self.inputs}")
        batch, outs = self.blobs[first].shape[0], {}
        for start in range(0, n, batch):
            chunk = {k: np.asarray(backend.to_numpy(v[start:start + batch])) for k, v in inputs.items()}
            valid = len(chunk[first])
            if valid < batch:                    # the last batch zero-padded, as pycaffe does
                chunk = {k: np.concatenate([v, np.zeros((batch - valid,) + v.shape[1:], v.dtype)])
                         for k, v in chunk.items()}
            part = self.forward(blobs, **chunk)
            for name, value in part.items():
                outs.setdefault(name, []).append(backend.to_numpy(value)[:valid].copy())
        return {name: np.concatenate(parts) for name, parts in outs.items()}

    def set_input_arrays(self, data, labels, layer=None):
        """pycaffe's: give the (first, or named) MemoryData layer its arrays, data (N, C, H, W)
        and labels (N,), N a multiple of its batch_size; forward takes batches in turn."""
        memory = [n for n, lay in self.layer_dict.items() if lay.type == "MemoryData" and layer in (None, n)]
        if not memory:
            raise VggcaffeError(f"net '{self.name}' has no MemoryData layer" + (f" named '{layer}'" if layer else ""))
        self.layer_dict[memory[0]].set_arrays(data, labels)

    def clear_param_diffs(self):
        for blob in self.learnable_params:
            blob.diff[...] = 0

    # ------------------------------------------------------------ weights
    def save(self, path):
        from .weights import save_weights
        save_weights(self, path)

    def copy_from(self, path):
        from .weights import load_weights
        load_weights(self, path)

    def share_with(self, other):
        """Use `other`'s parameter blobs for layers of the same name (test nets share the train net's)."""
        for name, blobs in self.params.items():
            theirs = other.params.get(name)
            if theirs is None:
                continue
            for j, (mine, src) in enumerate(zip(blobs, theirs)):
                if mine.shape != src.shape:
                    raise VggcaffeError(f"cannot share param {j} of layer '{name}': shape {mine.shape} "
                                        f"vs {src.shape}")
                blobs[j] = src


def _is_phase(value):
    return (isinstance(value, str) and value.upper() in PHASES) or (
        isinstance(value, int) and value in PHASES.values())


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out
