"""Weight files: .npz (keys "<layer>/<i>") and Caffe's binary .caffemodel (V1 or V2).

Loading follows Caffe's CopyTrainedLayersFrom: weights are matched to layers by
name, source layers the net lacks are skipped, and a shape mismatch is an error
naming the layer and both shapes. Legacy 4-D blob shapes (num, channels,
height, width) are compared right-aligned, so a V1 fc6 weight 1x1x4096x25088
fits a 4096x25088 blob. npz files are read with allow_pickle=False.
"""
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from . import backend
from .errors import VggcaffeError
from .proto import caffe_pb2
from .prototxt import upgrade_net


def blob_proto_to_array(proto):
    """The array a BlobProto holds, with its shape (legacy 4-D when `shape` is absent)."""
    if proto.HasField("shape"):
        shape = tuple(proto.shape.dim)
    else:
        shape = (proto.num, proto.channels, proto.height, proto.width)
    data = proto.double_data if len(proto.double_data) else proto.data
    array = np.array(data, dtype=np.float64 if len(proto.double_data) else np.float32)
    if array.size != int(np.prod(shape)):
        raise VggcaffeError(f"blob holds {array.size} values but its shape {shape} needs {int(np.prod(shape))}")
    return array.reshape(shape), not proto.HasField("shape")


# --- writing BlobProtos from the arrays' bytes ------------------------------------------
# protobuf's Python API takes repeated floats one Python float at a time: a VGG-16 solver
# state took 9.5 s and 4.3 GiB beyond its arrays. These write the same bytes as
# SerializeToString (fields in number order, packed floats) as pieces, the values being
# views of the arrays' own memory.
def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def message_field(number, pieces):
    """Pieces of a length-delimited field `number` holding the serialized `pieces`."""
    return [_varint(number << 3 | 2), _varint(sum(len(p) for p in pieces))] + pieces


def blob_proto_pieces(array):
    """A BlobProto of `array` (its shape; float64 as double_data, else float32 data),
    serialized, as pieces: what protobuf writes for the same message."""
    array = np.asarray(array)
    double = array.dtype == np.float64
    values = np.ascontiguousarray(array, dtype="<f8" if double else "<f4").reshape(-1)
    shape = caffe_pb2.BlobProto()
    shape.shape.dim.extend(array.shape)
    data = message_field(8 if double else 5, [memoryview(values).cast("B")]) if values.size else []
    return [shape.SerializeToString()] + data if double else data + [shape.SerializeToString()]


def _some(names, most=6):
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _shapes_match(target, source, legacy):
    if tuple(target) == tuple(source):
        return True
    if legacy and len(target) <= 4:
        return (1,) * (4 - len(target)) + tuple(target) == tuple(source)
    return False


def _umask():
    """The process's umask, read without setting it (no window where other threads' files
    would get mode 0666), from /proc where there is one."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise VggcaffeError(f"cannot write {path}: {e.strerror} ({path.parent})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())          # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise VggcaffeError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def save_weights(net, path):
    """Write the net's parameters, atomically: a path ending in .npz gets arrays keyed
    "<layer>/<i>", any other a binary NetParameter (.caffemodel, as pycaffe's net.save)."""
    path = Path(path)
    if path.suffix != ".npz":
        pieces = [caffe_pb2.NetParameter(name=net.name).SerializeToString()]
        for name, blobs in net.params.items():                  # NetParameter.layer = 100
            layer = [caffe_pb2.LayerParameter(name=name, type=net.layer_dict[name].type).SerializeToString()]
            for blob in blobs:                                   # LayerParameter.blobs = 7
                layer += message_field(7, blob_proto_pieces(backend.to_numpy(blob.data)))
            pieces += message_field(100, layer)
        _atomic_write(path, lambda f: f.writelines(pieces))
    else:
        arrays = {f"{name}/{j}": backend.to_numpy(b.data) for name, blobs in net.params.items()
                  for j, b in enumerate(blobs)}
        _atomic_write(path, lambda f: np.savez(f, **arrays))


def read_weights(path):
    """{layer name: [(array, legacy_shape)]} from a .npz or .caffemodel file."""
    path = Path(path)
    if not path.exists():
        raise VggcaffeError(f"{path}: no such weights file")
    if path.is_dir():
        raise VggcaffeError(f"{path}: is a folder, not a weights file")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"            # .npz is a zip archive, whatever its name
    if zipped:
        out = {}
        try:
            with np.load(path, allow_pickle=False) as data:
                for key in data.files:
                    layer, _, index = key.rpartition("/")
                    if not layer or not index.isdigit():
                        raise VggcaffeError(f"{path}: key '{key}' is not '<layer>/<index>'")
                    out.setdefault(layer, {})[int(index)] = (data[key], False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise VggcaffeError(f"{path}: not a readable .npz file ({e})") from None
        return {k: [v[i] for i in sorted(v)] for k, v in out.items()}
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise VggcaffeError(f"{path}: not a binary NetParameter (.caffemodel): {e}") from None
    param = upgrade_net(param)
    try:
        out = {layer.name: [blob_proto_to_array(b) for b in layer.blobs] for layer in param.layer if layer.blobs}
    except VggcaffeError as e:
        raise VggcaffeError(f"{path}: {e}") from None
    if not out:
        raise VggcaffeError(f"{path}: holds no weights (neither an .npz archive nor a .caffemodel with layer blobs)")
    return out


def upgrade_binary(source, output):
    """Caffe's upgrade_net_proto_binary: a .caffemodel (V1 `layers`, legacy fields) rewritten
    in the current format (V2 `layer`, blobs with shapes left as they are)."""
    path = Path(source)
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(path.read_bytes())
    except OSError as e:
        raise VggcaffeError(f"{path}: cannot read ({e.strerror or e})") from None
    except DecodeError as e:
        raise VggcaffeError(f"{path}: not a binary NetParameter (.caffemodel): {e}") from None
    data = upgrade_net(param).SerializeToString()
    _atomic_write(output, lambda f: f.write(data))


def load_weights(net, path):
    """Copy weights into `net` by layer name (Caffe's CopyTrainedLayersFrom). A file that
    fills none of the net's layers is an error (the wrong file); layers it leaves out keep
    their initialisation, with a warning naming them."""
    weights = read_weights(path)
    matched = [name for name in weights if name in net.params]
    if net.params and not matched:
        raise VggcaffeError(f"{path}: none of its layers ({_some(weights)}) is a layer with parameters of "
                            f"net '{net.name}' ({_some(net.params)}); weights are matched by layer name")
    left = [name for name in net.params if name not in weights]
    if left and matched:
        from .log import log
        log(f"Warning: {path} has no weights for layer(s) {_some(left)}: they keep their initialisation")
    for name in matched:
        arrays, blobs = weights[name], net.params[name]
        if len(arrays) != len(blobs):
            raise VggcaffeError(f"{path}: layer '{name}' has {len(arrays)} parameter blobs in the file "
                                f"but {len(blobs)} in the net")
        for j, ((array, legacy), blob) in enumerate(zip(arrays, blobs)):
            if not _shapes_match(blob.shape, array.shape, legacy):
                raise VggcaffeError(f"{path}: cannot copy param {j} of layer '{name}': shape mismatch, "
                                    f"file has {tuple(array.shape)}, net has {tuple(blob.shape)}")
            blob.data[...] = blob._xp.asarray(array.reshape(blob.shape), dtype=blob.dtype)
