"""CPU worker threads for the NumPy work between GEMMs (copies, elementwise passes, updates),
and per-thread scratch arrays for it.

NumPy releases the GIL inside copies and ufuncs, so splitting such work over
blocks (of images, channels or parameter blobs) runs it on all cores. The
calling thread takes the first block itself; a pool of WORKERS - 1 threads,
made on first use, takes the rest. Work below MIN_PARALLEL_ELEMENTS runs in the
caller only (handing it over costs more than it saves).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MIN_PARALLEL_ELEMENTS = 1 << 18
_pool = {}
_scratch = threading.local()


def over_blocks(xp, fn, count, work):
    """Call fn(i0, i1) on blocks covering [0, count), in parallel on NumPy
    (`work`: elements touched, to decide whether threads pay)."""
    if xp is not np or WORKERS == 1 or count == 1 or work < MIN_PARALLEL_ELEMENTS:
        fn(0, count)
        return
    n = min(count, WORKERS)
    bounds = [count * t // n for t in range(n + 1)]
    run_split(fn, list(zip(bounds[:-1], bounds[1:])))


def over_items(xp, fn, sizes):
    """Call fn(i0, i1) on runs of items covering range(len(sizes)), split so each
    run holds about the same number of elements, in parallel on NumPy."""
    total = sum(sizes)
    if xp is not np or WORKERS == 1 or len(sizes) < 2 or total < MIN_PARALLEL_ELEMENTS:
        fn(0, len(sizes))
        return
    cuts, run = [0], 0
    for i, size in enumerate(sizes[:-1], 1):
        run += size
        if run * WORKERS >= total * len(cuts) and len(cuts) < WORKERS:
            cuts.append(i)
    cuts.append(len(sizes))
    run_split(fn, list(zip(cuts[:-1], cuts[1:])))


def run_split(fn, arg_tuples):
    """fn(*args) for every tuple, the first in this thread and the others in the pool, in parallel."""
    if "executor" not in _pool:
        _pool["executor"] = ThreadPoolExecutor(max(1, WORKERS - 1), thread_name_prefix="vggcaffe-cpu")
    futures = [_pool["executor"].submit(fn, *args) for args in arg_tuples[1:]]
    fn(*arg_tuples[0])
    for f in futures:
        f.result()


def scratch(xp, slot, shape, dtype):
    """A reusable array of `shape` for this thread; grows, never shrinks."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (xp.__name__, slot, np.dtype(dtype).str)
    size = int(np.prod(shape, dtype=np.int64))
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buf = xp.empty(size, dtype)
        buffers[key] = buf
    return buf[:size].reshape(shape)
