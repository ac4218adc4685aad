"""Caffe's image databases: LMDB of Datum records, read by the Data layer and written by the tools.

A Datum (caffe.proto) holds one sample: `data`, the pixels as uint8 C x H x W
in OpenCV's BGR order (what Caffe's convert_imageset writes), or, with
`encoded`, the bytes of a JPEG/PNG file; or `float_data`; and the `label`.
Records are read in key order (Caffe's cursor order). vggcaffe's pipeline is
RGB, so 3-channel pixels are turned from BGR to RGB on read and back on write:
databases written here read the same in Caffe and the other way round.
LevelDB (Caffe's older default backend) is not read: it has no maintained
Python binding; a LevelDB folder gets an error saying so.

Tools (Caffe's names and flags): `vggcaffe convert_imageset ROOT/ LISTFILE DB`
writes a listing's images into an LMDB; `vggcaffe compute_image_mean DB
[OUT.binaryproto]` writes their mean image (RGB, as the pipeline subtracts it).
"""
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import VggcaffeError
from ..proto import caffe_pb2
from .image_io import load_image, read_listing, resize


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise VggcaffeError("reading or writing an LMDB needs the lmdb package: pip install lmdb") from None
    return lmdb


_READERS = {}       # resolved path -> (data.mdb's inode, the read-only Environment): lmdb opens a path once


def open_db(path, who, write=False, map_size=1 << 40):
    """An lmdb Environment on `path` (a folder holding data.mdb); errors start with `who`.
    Read-only ones are shared by every reader of the path in this process."""
    path = Path(path)
    if not write:
        if (path / "CURRENT").exists() and not (path / "data.mdb").exists():
            raise VggcaffeError(f"{who}: {path} is a LevelDB database, which vggcaffe does not read; "
                                f"write an LMDB with `vggcaffe convert_imageset --backend lmdb`")
        if not (path / "data.mdb").exists():
            raise VggcaffeError(f"{who}: {path} is not an LMDB database (no data.mdb in it)")
        inode = (path / "data.mdb").stat().st_ino
        cached = _READERS.pop(path.resolve(), None)
        if cached is not None:
            if cached[0] == inode:
                _READERS[path.resolve()] = cached
                return cached[1]
            cached[1].close()                    # the database was made anew at this path
    lmdb = _lmdb()
    try:
        env = lmdb.open(str(path), readonly=not write, lock=write, readahead=False, map_size=map_size,
                        max_readers=512, create=write)
    except lmdb.Error as e:
        raise VggcaffeError(f"{who}: cannot open LMDB {path}: {e}") from None
    if not write:
        _READERS[path.resolve()] = (inode, env)
    return env


def datum_to_image(datum, color=None, where=""):
    """A Datum's sample as (H, W, C): uint8 pixels (RGB, or grey), or float32 for float_data.
    Encoded images keep their own channels (grey stays grey, as Caffe decodes them natively)
    unless `color` is True (3) or False (1)."""
    if datum.encoded:
        try:
            with Image.open(io.BytesIO(datum.data)) as im:
                grey = im.mode in ("1", "L", "LA", "I", "I;16", "F") if color is None else not color
                im = im.convert("L" if grey else "RGB")
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, UnidentifiedImageError) as e:
            raise VggcaffeError(f"cannot decode the encoded image of {where}: {e}") from None
        return a if a.ndim == 3 else a[:, :, None]
    c, h, w = datum.channels, datum.height, datum.width
    if len(datum.float_data):
        values = np.asarray(datum.float_data, np.float32)
    else:
        values = np.frombuffer(datum.data, np.uint8)
    if values.size != c * h * w or values.size == 0:
        raise VggcaffeError(f"{where}: Datum holds {values.size} values for channels x height x width "
                            f"{c} x {h} x {w}")
    image = values.reshape(c, h, w).transpose(1, 2, 0)
    return image[:, :, ::-1] if c == 3 and values.dtype == np.uint8 else image


ENCODINGS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}


def image_to_datum(image, label, encode_type=""):
    """A Datum of an (H, W, C) uint8 RGB image: raw BGR C x H x W, or encoded as jpg (at
    OpenCV's default quality, 95) or png."""
    h, w, c = image.shape
    datum = caffe_pb2.Datum(channels=c, height=h, width=w, label=int(label))
    if encode_type:
        buffer = io.BytesIO()
        Image.fromarray(image if c == 3 else image[:, :, 0]).save(buffer, ENCODINGS[encode_type], quality=95)
        datum.data, datum.encoded = buffer.getvalue(), True
    else:
        datum.data = np.ascontiguousarray((image[:, :, ::-1] if c == 3 else image).transpose(2, 0, 1)).tobytes()
    return datum


class _Labels:
    """labels[indices] of an LmdbSource, read from the records (no pass over the whole DB)."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, indices):
        return np.array([d.label for d in self.source.datums(np.atleast_1d(indices))], np.int64)


class LmdbSource:
    """The records of an LMDB in key order, decoded on demand (the Data layer's source)."""

    def __init__(self, path, color, layer):
        self.path, self.color, self.who = str(path), color, f"layer '{layer}'"
        self.env = open_db(path, self.who)
        with self.env.begin() as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))
        if not self.keys:
            raise VggcaffeError(f"{self.who}: LMDB {path} holds no records")
        self.labels = _Labels(self)

    def __len__(self):
        return len(self.keys)

    def datums(self, indices):
        out = []
        with self.env.begin() as txn:
            for i in indices:
                datum = caffe_pb2.Datum()
                try:
                    datum.ParseFromString(txn.get(self.keys[i]))
                except Exception as e:          # protobuf's DecodeError, or a missing value
                    raise VggcaffeError(f"{self.who}: record {self.names([i])[0]} is not a Datum ({e})") from None
                out.append(datum)
        return out

    def first_shape(self):
        return self.get([0])[0].shape

    def get(self, indices, map_fn=map):
        pairs = list(zip(self.datums(indices), self.names(indices)))
        return list(map_fn(lambda p: datum_to_image(p[0], self.color, p[1]), pairs))

    def names(self, indices):
        return [f"{self.path}[{self.keys[i].decode(errors='replace')}]" for i in indices]


def convert_imageset(root, listing, db_path, resize_height=0, resize_width=0, shuffle=False, gray=False,
                     encode_type="", seed=0, log=print):
    """Caffe's convert_imageset: the images of a listing ("path label" lines) into a new
    LMDB, keys "%08d_<path>" (the position in the listing's, or a shuffled, order),
    optionally resized. With encode_type (jpg, png, or "same": the file's own type) an
    image that needs no resize or grey conversion is stored as its file's bytes, as
    Caffe does; images that cannot be read are skipped with a warning, as in Caffe."""
    if bool(resize_height) != bool(resize_width):
        raise VggcaffeError("give both --resize_height and --resize_width, or neither")
    if Path(db_path).exists():
        raise VggcaffeError(f"{db_path} exists; convert_imageset writes a new database")
    names, labels, lines = read_listing(listing)
    order = np.random.default_rng(seed).permutation(len(names)) if shuffle else np.arange(len(names))
    env = open_db(db_path, "convert_imageset", write=True)
    txn = env.begin(write=True)
    count = 0
    for position, i in enumerate(order):
        path = os.path.join(root, names[i])
        try:
            image = load_image(path, not gray, listing, lines[i])
        except VggcaffeError as e:
            log(f"Warning: skipped: {e}")
            continue
        kind = Path(path).suffix.lower().lstrip(".")
        same = encode_type == "same" or ENCODINGS.get(encode_type) == ENCODINGS.get(kind)
        if resize_height:
            image = resize(image, resize_height, resize_width)
        if encode_type and same and kind in ENCODINGS and not resize_height and not gray:
            h, w, c = image.shape
            datum = caffe_pb2.Datum(channels=c, height=h, width=w, label=int(labels[i]), encoded=True,
                                    data=Path(path).read_bytes())
        else:
            datum = image_to_datum(image, labels[i], "jpg" if encode_type == "same" else encode_type)
        txn.put(f"{position:08d}_{names[i]}".encode(), datum.SerializeToString())
        count += 1
        if count % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
            log(f"Processed {count} files.")
    txn.commit()
    env.close()
    log(f"Processed {count} files.")
    return count


def compute_image_mean(db_path, output=None, log=print):
    """Caffe's compute_image_mean: the mean image of an LMDB's records as a BlobProto
    (1, C, H, W) in the pipeline's RGB order, written to `output` when given; returns it."""
    source = LmdbSource(db_path, None, "compute_image_mean")
    total, shape = None, None
    for start in range(0, len(source), 256):
        index = range(start, min(start + 256, len(source)))
        for image, name in zip(source.get(index), source.names(index)):
            if shape is None:
                shape, total = image.shape, np.zeros(image.shape, np.float64)
            elif image.shape != shape:
                raise VggcaffeError(f"{name} is {image.shape[:2]}, the first record {shape[:2]}: a mean image "
                                    f"needs one size (convert_imageset --resize_height/--resize_width)")
            total += image
    mean = (total / len(source)).transpose(2, 0, 1)[None].astype(np.float32)     # (1, C, H, W)
    for c, value in enumerate(mean.reshape(mean.shape[1], -1).mean(axis=1)):
        log(f"mean_value channel [{c}]: {value:.6g}")
    if output:
        from ..weights import _atomic_write, blob_proto_pieces
        _atomic_write(output, lambda f: f.writelines(blob_proto_pieces(mean)))
        log(f"Write to {output}")
    return mean
