"""Read and write nets and solvers in Caffe's text format, with Caffe's upgrades.

On read, as Caffe's upgrade_proto does: V1 `layers { type: CONVOLUTION }` become
V2 `layer { type: "Convolution" }` (blobs_lr/weight_decay -> param lr_mult /
decay_mult), `input`/`input_dim`/`input_shape` become an Input layer, and
data-layer transform fields move to transform_param. Parse errors become one
VggcaffeError naming file:line:column, the enclosing layer and, for an unknown
field, the nearest valid name.
"""
import difflib
import re
from pathlib import Path

from google.protobuf import text_format

from .errors import VggcaffeError
from .proto import caffe_pb2

# V1LayerParameter.LayerType -> V2 type string (Caffe's UpgradeV1LayerType).
V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# Per-layer parameter messages that V1 and V2 layers both carry, by field name.
_SHARED_PARAMS = tuple(f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields
                       if f.name.endswith("_param") and f.name in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name)

# Legacy transform fields in data-layer parameters (Caffe's UpgradeNetDataTransformation).
_LEGACY_TRANSFORM = ("scale", "mean_file", "crop_size", "mirror")


def read_text(path, message):
    """Parse the text-format file at `path` into `message`; returns (message, text)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise VggcaffeError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VggcaffeError(f"{path}: cannot read: {e}") from None
    parse_text(text, message, str(path))
    return message, text


def parse_text(text, message, filename="<string>"):
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as e:
        raise VggcaffeError(_describe_parse_error(e, text, filename)) from None
    return message


def read_net(path):
    """A NetParameter from a text prototxt, upgraded to the V2 format."""
    net, _ = read_text(path, caffe_pb2.NetParameter())
    return upgrade_net(net)


def read_solver(path):
    """A solver file, upgraded as Caffe's ReadSolverParamsFromTextFileOrDie does: the old
    solver_type enum, and a snapshot_prefix that is missing (the solver file's path without
    its extension) or a folder (that folder / the solver file's stem; a folder is a prefix
    ending in "/", or one that exists, so the names do not change once it is made)."""
    solver, _ = read_text(path, caffe_pb2.SolverParameter())
    path = Path(path)
    prefix = solver.snapshot_prefix
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = str(path.with_suffix(""))
    elif prefix.endswith("/") or Path(prefix).is_dir():
        solver.snapshot_prefix = str(Path(prefix) / path.stem)
    return upgrade_solver(solver)


def write_text(message, path):
    Path(path).write_text(text_format.MessageToString(message))


def to_text(message):
    return text_format.MessageToString(message)


def layer_lines(text):
    """{layer name: line number} for the top-level layer blocks of a net's text."""
    lines, depth, block_start = {}, 0, None
    for lineno, line in enumerate(text.splitlines(), 1):
        code = _strip_comment(line)
        if depth == 0 and re.match(r"\s*layers?\s*\{", code):
            block_start = lineno
        if (depth == 1 or block_start == lineno) and block_start:
            m = re.search(r'\bname\s*:\s*"([^"]*)"', code)
            if m and m.group(1) not in lines:
                lines[m.group(1)] = block_start
        depth += code.count("{") - code.count("}")
    return lines


# ------------------------------------------------------------------ errors

def _strip_comment(line):
    out, quote = [], None
    for ch in line:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out)


def _enclosing_layer(text, line):
    """Name of the top-level layer block containing `line` (1-based), or None."""
    depth, start = 0, None
    rows = text.splitlines()
    for lineno, raw in enumerate(rows, 1):
        code = _strip_comment(raw)
        if depth == 0 and re.match(r"\s*layers?\s*\{", code):
            start = lineno
        depth += code.count("{") - code.count("}")
        if lineno >= line:
            break
        if depth == 0:
            start = None
    if start is None:
        return None
    depth = 0
    for raw in rows[start - 1:]:
        code = _strip_comment(raw)
        m = re.search(r'\bname\s*:\s*"([^"]*)"', code)
        if m and depth <= 1:
            return m.group(1)
        depth += code.count("{") - code.count("}")
        if depth <= 0 and raw is not rows[start - 1]:
            break
    return None


def _describe_parse_error(err, text, filename):
    line, col = err.GetLine(), err.GetColumn()
    msg = str(err)
    msg = re.sub(r"^\d+:\d+\s*:\s*", "", msg)
    where = f"{filename}:{line}:{col}" if line else filename
    layer = _enclosing_layer(text, line) if line else None
    inside = f" (in layer '{layer}')" if layer else ""
    m = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', msg)
    if m:
        fields = _field_names(m.group(1))
        close = difflib.get_close_matches(m.group(2), fields, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid fields: {', '.join(sorted(fields))}"
        return f"{where}: unknown field '{m.group(2)}' in {m.group(1).split('.')[-1]}{inside}{hint}"
    return f"{where}: {msg}{inside}"


def _field_names(full_name):
    name = full_name.split(".", 1)[-1]
    desc = caffe_pb2.DESCRIPTOR.message_types_by_name.get(name.split(".")[0])
    for part in name.split(".")[1:]:
        desc = desc.nested_types_by_name[part] if desc else None
    return [f.name for f in desc.fields] if desc else []


# ------------------------------------------------------------------ upgrades

def upgrade_net(net):
    """Apply Caffe's upgrades in place: V1 layers, input fields, transform fields."""
    if net.layers and net.layer:
        raise VggcaffeError(f"net '{net.name}' mixes V1 'layers' and V2 'layer' fields; use one")
    if net.layers:
        for v1 in net.layers:
            net.layer.add().CopyFrom(_upgrade_v1_layer(v1))
        net.ClearField("layers")
    _upgrade_inputs(net)
    for layer in net.layer:
        _upgrade_transform(layer)
    return net


def _upgrade_v1_layer(v1):
    layer = caffe_pb2.LayerParameter()
    layer.name = v1.name
    type_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    if v1.type == caffe_pb2.V1LayerParameter.NONE:
        raise VggcaffeError(f"V1 layer '{v1.name}' has no type")
    layer.type = V1_TYPES[type_name]
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.loss_weight.extend(v1.loss_weight)
    layer.blobs.extend(v1.blobs)
    n_param = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay), len(v1.blob_share_mode))
    for i in range(n_param):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for field in _SHARED_PARAMS:
        if v1.HasField(field):
            getattr(layer, field).CopyFrom(getattr(v1, field))
    return layer


def _upgrade_inputs(net):
    if not net.input:
        if net.input_dim or net.input_shape:
            raise VggcaffeError(f"net '{net.name}': input_dim/input_shape given without 'input' names")
        return
    n = len(net.input)
    if net.input_shape:
        if len(net.input_shape) != n:
            raise VggcaffeError(f"net '{net.name}': {n} inputs but {len(net.input_shape)} input_shape entries")
        shapes = list(net.input_shape)
    else:
        if len(net.input_dim) != 4 * n:
            raise VggcaffeError(
                f"net '{net.name}': {n} inputs need {4 * n} input_dim values, got {len(net.input_dim)}")
        shapes = [caffe_pb2.BlobShape(dim=net.input_dim[4 * i:4 * i + 4]) for i in range(n)]
    layer = caffe_pb2.LayerParameter(name="input", type="Input", top=list(net.input))
    layer.input_param.shape.extend(shapes)
    layers = [layer] + list(net.layer)
    net.ClearField("layer")
    net.layer.extend(layers)
    for field in ("input", "input_dim", "input_shape"):
        net.ClearField(field)


def _upgrade_transform(layer):
    for field in ("data_param", "image_data_param"):
        if not layer.HasField(field):
            continue
        source = getattr(layer, field)
        for name in _LEGACY_TRANSFORM:
            if source.HasField(name):
                setattr(layer.transform_param, name, getattr(source, name))
                source.ClearField(name)


def upgrade_solver(solver):
    """Caffe's solver upgrade: the deprecated solver_type enum becomes `type`."""
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise VggcaffeError("solver gives both 'solver_type' and 'type'; use 'type'")
        names = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
        solver.type = names[solver.solver_type]
        solver.ClearField("solver_type")
    return solver
