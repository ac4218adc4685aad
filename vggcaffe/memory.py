"""Activation diffs that share memory (`share_diffs`), for nets on either backend.

Caffe gives every blob its own diff for the life of the net. During backward a
blob's diff is needed only from the backward of its last consumer down to that
of its producer, so blobs whose spans do not overlap can use the same memory:
for a chain like VGG, two buffers of the largest activation's size instead of
one per blob. The GPU's `prepare_net` applies it to training nets; a diff of an
intermediate blob then holds its gradient only during that span.
"""
import numpy as np

from .backend import array_module
from .blob import is_channels_last


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
    flat = memory[:like.nbytes].view(like.dtype)
    if like.ndim == 4 and is_channels_last(like) and not like.flags.c_contiguous:
        n, c, h, w = like.shape
        return flat.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return flat.reshape(like.shape)
