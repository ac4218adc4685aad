"""Activations that share memory, for nets on either backend: diffs in training
(`share_diffs`), data in forward-only nets (`share_data`).

Caffe gives every blob its own data and diff for the life of the net. During
backward a blob's diff is needed only from the backward of its last consumer
down to that of its producer, so blobs whose spans do not overlap can use the
same memory: for a chain like VGG, two buffers of the largest activation's size
instead of one per blob. The GPU's `prepare_net` applies it to training nets; a
diff of an intermediate blob then holds its gradient only during that span.
In a net that only runs forward (evaluation), a blob's data is likewise needed
only from its producer's forward to its last consumer's, as PyTorch frees
intermediate activations under no_grad; `share_data` makes it so, keeping the
outputs (and any blobs asked for) whole.
"""
import numpy as np

from .backend import array_module
from .blob import is_channels_last
from .errors import VggcaffeError


def share_diffs(net):
    """Let activation blobs whose diffs are live at disjoint times in backward share memory.

    A blob's diff is live from the backward of its last consumer down to that of
    its first producer (in-place layers keep one blob). Blobs with a loss weight,
    net inputs and outputs, and blobs whose diff is already an alias of another's
    keep their own arrays; so do blobs whose producer runs no backward, and all
    of a TEST net's (its diffs are then allocated only if a backward is ever run
    on it, which the solver never does). Slots are assigned greedily in producer
    order; each holds the largest of its blobs, and every blob gets a view of
    the same layout (NCHW or channels-last) and dtype as its data."""
    net.shared_diff_bytes = 0
    if net.phase == "TEST":
        return net
    span, order = {}, []
    for i, (bottom, top) in enumerate(zip(net._bottoms, net._tops)):
        for b in bottom:
            if id(b) in span:
                span[id(b)][2] = i
        for t in top:
            if id(t) not in span and net._need_backward[i]:
                span[id(t)] = [t, i, i]
                order.append(id(t))
    keep = {id(net.blobs[name]) for name in list(net.inputs) + list(net.outputs) if name in net.blobs}
    keep |= {id(net._tops[i][t]) for i, t in net.loss_weights}
    starts = {}
    for blob, _, _ in span.values():
        if blob.has_diff:
            starts.setdefault(_address(blob.diff), []).append(id(blob))
    keep |= {b for ids in starts.values() if len(ids) > 1 for b in ids}
    slots = []                                            # [last layer index, bytes, [blobs]]
    for key in order:
        blob, first, last = span[key]
        if key in keep or last == first or blob.data.ndim == 0:
            continue
        slot = next((s for s in slots if s[0] < first), None)
        if slot is None:
            slot = [0, 0, []]
            slots.append(slot)
        slot[0], slot[1] = last, max(slot[1], blob.data.nbytes)
        slot[2].append(blob)
    for _, nbytes, blobs in slots:
        memory = array_module(blobs[0].data).empty(nbytes, np.uint8)
        for blob in blobs:
            blob.diff = _view(memory, blob.data)
    net.shared_diff_bytes = sum(s[1] for s in slots)
    return net


def _address(a):
    """Where a NumPy or CuPy array's memory starts."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.__array_interface__["data"][0]


def _view(memory, like):
    """An array over `memory` with `like`'s shape, dtype and layout (C-contiguous or channels-last)."""
    return _view_as(memory, like.shape, like.dtype, _strided_channels_last(like))


def _view_as(memory, shape, dtype, channels_last=False):
    """An array of `shape` and `dtype` over `memory`: C-contiguous, or a channels-last
    (N, C, H, W) view of NHWC memory."""
    dtype = np.dtype(dtype)
    flat = memory[:int(np.prod(shape, dtype=np.int64)) * dtype.itemsize].view(dtype)
    if channels_last:
        n, c, h, w = shape
        return flat.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return flat.reshape(shape)


def _strided_channels_last(a):
    """`a` is a channels-last view that is not also C-contiguous."""
    return a.ndim == 4 and is_channels_last(a) and not a.flags.c_contiguous


def share_data(net, keep=()):
    """Let activation blobs of a forward-only net whose data is live at disjoint times share
    memory; returns `net`.

    A blob's data is live from the forward of its producer to that of its last consumer
    (in-place layers keep one blob; a Split's tops are its bottom's data). Net inputs and
    outputs, the blobs named in `keep`, loss tops and the tops of layers without bottoms
    (data layers, which may fill them from other threads) keep their own arrays. Slots are
    assigned greedily in producer order, as in `share_diffs`. A blob moves into its slot
    at the next forward (`DataSlots.place`, run after every layer's reshape), so a slot
    has the size the next input needs (not the size the net was built at, a deploy net's
    batch of 10, say) and grows when a later input needs more. Backward on such a net is
    refused: its intermediate data is gone by then."""
    root = {}
    for i, (bottom, top) in enumerate(zip(net._bottoms, net._tops)):
        if net.layers[i].type == "Split":
            for t in top:
                root[id(t)] = root.get(id(bottom[0]), id(bottom[0]))
    span, order = {}, []
    for i, (bottom, top) in enumerate(zip(net._bottoms, net._tops)):
        for b in bottom:
            key = root.get(id(b), id(b))
            if key in span:
                span[key][2] = i
        if not bottom or net.layers[i].type == "Split":
            continue
        for t in top:
            if id(t) not in span:
                span[id(t)] = [t, i, i]
                order.append(id(t))
    named = set(net.inputs) | set(net.outputs) | set(keep)
    missing = sorted(set(keep) - set(net.blobs))
    if missing:
        raise VggcaffeError(f"share_data: net '{net.name}' has no blob {', '.join(map(repr, missing))}")
    kept = {root.get(id(net.blobs[name]), id(net.blobs[name])) for name in named if name in net.blobs}
    kept |= {id(net._tops[i][t]) for i, t in net.loss_weights}
    slots = []                                            # [last layer index, [blobs]]
    for key in order:
        blob, first, last = span[key]
        if key in kept or not blob.shape:
            continue
        slot = next((s for s in slots if s[0] < first), None)
        if slot is None:
            slot = [0, []]
            slots.append(slot)
        slot[0] = last
        slot[1].append(blob)
    net.data_slots = DataSlots([blobs for _, blobs in slots]) if slots else None
    return net


class DataSlots:
    """The shared data memory of a net made by `share_data`: each slot one buffer, viewed
    by blobs whose data is live at disjoint times."""

    def __init__(self, slots):
        self.buffers = [None] * len(slots)
        self.slot_of = {id(blob): k for k, blobs in enumerate(slots) for blob in blobs}

    @property
    def nbytes(self):
        """Bytes the slots hold."""
        return sum(b.nbytes for b in self.buffers if b is not None)

    def place(self, blobs):
        """Make the data of each of `blobs` that has a slot a view of it (after a reshape
        gave it an array of its own, or its slot grew); a slot grows to fit."""
        for blob in blobs:
            k = self.slot_of.get(id(blob))
            if k is None:
                continue
            buffer, like = self.buffers[k], blob.template      # nothing allocated for a blob without data
            nbytes = blob.count * like.itemsize
            if buffer is not None and blob.has_data and nbytes <= buffer.nbytes and _address(like) == _address(buffer):
                continue
            if buffer is None or buffer.nbytes < nbytes:
                buffer = self.buffers[k] = array_module(like).empty(nbytes, np.uint8)
            blob.data = _view_as(buffer, blob.shape, like.dtype, blob.channels_last)
