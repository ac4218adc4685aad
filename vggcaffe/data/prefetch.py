"""Producing batches, in order, in a background thread.

BatchProducer makes one batch per call (indices from a BatchOrder, images
from a source, augmentation from one Generator) and returns it with the
resume state reached after it. Prefetcher runs a producer in one daemon
thread, `depth` batches ahead; since one thread makes the batches in order,
they are the same as when the producer is called directly.
"""
import queue
import threading
import weakref


class BatchProducer:
    """Callable: (out=None) -> (data (N, C, H, W), labels (N,), state after this batch);
    the data is written into `out` when that fits (Transformer's `out`)."""

    def __init__(self, source, transformer, order, rng, label_dtype, map_fn=map):
        self.source, self.transformer, self.order = source, transformer, order
        self.rng, self.label_dtype, self.map_fn = rng, label_dtype, map_fn

    def state(self):
        return {"epoch": self.order.epoch, "position": self.order.position,
                "rng": self.rng.bit_generator.state}

    def __call__(self, out=None):
        indices = self.order.next()
        images = self.source.get(indices, self.map_fn)
        data = self.transformer(images, self.rng, self.source.names(indices), self.map_fn, out)
        return data, self.source.labels[indices].astype(self.label_dtype), self.state()


def _drain(q, stop):
    """Stop the worker: after this, its one pending put (if any) finds room, and it exits."""
    stop.set()
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _work(produce, q, stop):
    try:
        while not stop.is_set():
            try:
                item = (produce(), None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (None, e)
            q.put(item)
            if item[1] is not None:
                return
    finally:
        if hasattr(produce, "close"):   # e.g. the GPU feed: wait for its copies before its buffers go
            produce.close()


class Prefetcher:
    """A daemon thread calling `produce` ahead of get(); its exceptions are re-raised by get().
    When the thread ends (close(), or the Prefetcher collected), it calls produce.close()
    where the producer has one."""

    def __init__(self, produce, depth=3):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failure = None
        self._thread = threading.Thread(target=_work, args=(produce, self._queue, self._stop),
                                        name="vggcaffe-prefetch", daemon=True)
        self._finalizer = weakref.finalize(self, _drain, self._queue, self._stop)
        self._thread.start()

    def get(self):
        """The next batch, in production order (blocks until ready)."""
        if self._failure is not None:
            raise self._failure
        item, failure = self._queue.get()
        if failure is not None:
            self._failure = failure
            raise failure
        return item

    def close(self):
        """Stop the thread and wait for it (a batch in progress is finished, then dropped)."""
        self._finalizer()
        self._thread.join()
