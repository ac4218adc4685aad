"""Data layers: Data (Caffe's LMDB of Datums), ImageData (a Caffe image listing) and NpzData
(uint8 arrays in an .npz).

No bottoms. Tops: data (N, C, H, W) in the layer's dtype, channels RGB, and
optionally label (N,) holding the integer labels as floats (Caffe's way).
The transform is transform_param (vggcaffe/data/transforms.py). Data layers
have no backward.

Order, sharding, prefetch and resume (every layer here):
- One order per epoch, the same on every rank: a permutation seeded by
  (order_seed, epoch) when shuffle is set, else the source's order; at the end
  the layer wraps around into the next epoch (Caffe's semantics).
- `order_seed` (an int or a list of ints, SeedSequence entropy) must be equal
  on all ranks; the net sets it before setup, and it may be changed before
  the first forward. If unset at setup it is drawn from self.rng.
- set_shard(rank, size): each forward consumes a global batch of
  batch_size * size consecutive positions of the order and returns positions
  rank::size of it, so the ranks' batches are disjoint and make up the global
  batch. Augmentation draws come from self.rng, which differs per rank.
- A daemon thread prepares `prefetch` batches ahead (0: make them in forward);
  one thread makes them in order, so the batches do not depend on prefetch.
  On the GPU that thread also uploads each batch (pinned memory, a copy
  stream: vggcaffe/gpu/feed.py), and forward only queues a device copy.
  Its exceptions are re-raised by forward. close() stops it. Within a batch,
  `workers` threads decode and rescale images (pure functions, results kept
  in order, so they do not change the batches either).
- state() is a JSON-serialisable dict {"epoch", "position", "order_seed",
  "rng"} describing the point after the last batch forward returned;
  set_state(d) on a freshly set up layer (same prototxt, same shard) makes it
  draw exactly the batches the uninterrupted run would draw next. Batches
  already prefetched are dropped and the thread restarts from that point.
"""
import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import array_module
from ..data.prefetch import BatchProducer, Prefetcher
from ..data.sources import BatchOrder, ListingSource, NpzSource
from ..data.transforms import Transformer
from ..errors import VggcaffeError
from .base import Layer, register


class BaseDataLayer(Layer):
    exact_num_bottom = 0
    min_top = 1
    max_top = 2
    prefetch = 3
    workers = min(8, os.cpu_count() or 1)      # decode/rescale threads (ImageData, rescaling)
    _producer = _prefetcher = _stager = _pool = _state = _order_seed = None

    # --- what a subclass provides ------------------------------------------
    def open_source(self):
        raise NotImplementedError

    def batch_param(self):
        """(batch_size, shuffle, rand_skip)."""
        raise NotImplementedError

    # --- setup --------------------------------------------------------------
    def layer_setup(self, bottom, top):
        self.close()
        self._state = None
        self.batch_size, self.shuffle, self.rand_skip = self.batch_param()
        if self.batch_size < 1:
            raise self.error("batch_size must be at least 1")
        self.source = self.open_source()
        self.transformer = Transformer(self.param.transform_param, self.phase, self.name, self.dtype)
        if self._order_seed is None:
            self._order_seed = int(self.rng.integers(2**63))
        self.rank, self.num_shards = 0, 1
        c, h, w = self.transformer.output_shape(*self.source.first_shape())
        top[0].reshape(self.batch_size, c, h, w)
        if len(top) > 1:
            top[1].reshape(self.batch_size)

    def reshape(self, bottom, top):
        """Nothing: forward gives the tops each batch's shape (Caffe's data layers)."""

    @property
    def order_seed(self):
        return self._order_seed

    @order_seed.setter
    def order_seed(self, seed):
        """An int >= 0 or a list of them (numpy SeedSequence entropy)."""
        self._stop()
        self._order_seed = int(seed) if np.ndim(seed) == 0 else [int(v) for v in seed]

    def set_shard(self, rank, size):
        if not 0 <= rank < size:
            raise VggcaffeError(f"layer '{self.name}': shard rank {rank} is not in [0, {size})")
        self._stop()
        self.rank, self.num_shards = int(rank), int(size)

    # --- forward ------------------------------------------------------------
    def forward(self, bottom, top):
        xp = array_module(top[0].template)
        if self._producer is None:
            self._start(on_gpu=xp is not np)
        data, labels, self._state = self._prefetcher.get() if self._prefetcher else self._producer()
        if self._stager is not None:                   # uploaded by the prefetch thread
            data.deliver(top)
            return
        top[0].reshape(data.shape)                     # (N, C, H, W)
        top[0].data[...] = xp.asarray(data)
        if len(top) > 1:
            top[1].reshape(labels.shape)               # (N,)
            top[1].data[...] = xp.asarray(labels)

    # --- resume -------------------------------------------------------------
    def state(self):
        if self._state is None:
            return {"epoch": 0, "position": BatchOrder.skip(self.order_seed, self.rand_skip),
                    "order_seed": self.order_seed, "rng": self.rng.bit_generator.state}
        return copy.deepcopy(dict(self._state, order_seed=self.order_seed))

    def set_state(self, state):
        missing = {"epoch", "position", "order_seed", "rng"} - set(state)
        if missing:
            raise VggcaffeError(f"layer '{self.name}': data state lacks {sorted(missing)}")
        if not 0 <= int(state["position"]) < len(self.source):
            raise VggcaffeError(f"layer '{self.name}': data state position {state['position']} "
                                f"is outside the source's {len(self.source)} samples")
        self.order_seed = state["order_seed"]
        self._state = {"epoch": int(state["epoch"]), "position": int(state["position"]), "rng": state["rng"]}

    def close(self):
        """Stop the prefetch thread and the decode threads."""
        self._stop()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # --- the producer -------------------------------------------------------
    def _start(self, on_gpu=False):
        self._state = self.state()
        self.rng.bit_generator.state = self._state["rng"]
        order = BatchOrder(len(self.source), self.batch_size, self.shuffle, self.order_seed,
                           self.rank, self.num_shards)
        order.seek(self._state["epoch"], self._state["position"])
        if self._pool is None and self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"vggcaffe-decode-{self.name}")
        map_fn = self._pool.map if self._pool is not None else map
        self._producer = BatchProducer(self.source, self.transformer, order, self.rng, self.dtype, map_fn)
        if self.prefetch > 0:
            produce = self._producer
            if on_gpu and os.environ.get("VGGCAFFE_GPU_FEED", "1") != "0":
                from ..gpu.feed import Stager
                produce = self._stager = Stager(self._producer, self.prefetch)
            self._prefetcher = Prefetcher(produce, self.prefetch)

    def _stop(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
        if self._stager is not None:
            self._stager.close()
        self._producer = self._prefetcher = self._stager = None


@register("Data", "DATA")
class Data(BaseDataLayer):
    """Caffe's Data layer (data_param): the Datum records of an LMDB in key order
    (vggcaffe/data/db.py: raw BGR pixels become RGB, encoded ones are decoded),
    then transform_param. Caffe's order: no shuffle; rand_skip skips ahead."""

    def batch_param(self):
        p = self.param.data_param
        return p.batch_size, False, p.rand_skip

    def open_source(self):
        from ..data.db import LmdbSource
        p = self.param.data_param
        if not p.source:
            raise self.error("data_param.source is not set")
        return LmdbSource(p.source, None, self.name)      # native channels; force_color/gray transform them


@register("ImageData", "IMAGE_DATA")
class ImageData(BaseDataLayer):
    """Images listed in a text file (image_data_param): decoded with Pillow,
    EXIF-rotated, RGB (grey when is_color is false), resized to
    new_height x new_width when set, then transform_param."""

    def batch_param(self):
        p = self.param.image_data_param
        return p.batch_size, p.shuffle, p.rand_skip

    def open_source(self):
        p = self.param.image_data_param
        if not p.source:
            raise self.error("image_data_param.source is not set")
        t = self.param.transform_param
        color = (p.is_color or t.force_color) and not t.force_gray
        return ListingSource(p.source, p.root_folder, color, p.new_height, p.new_width, self.name)


@register("NpzData")
class NpzData(BaseDataLayer):
    """uint8 (N, H, W, C) RGB images and labels from an .npz file (npz_data_param)."""

    def batch_param(self):
        p = self.param.npz_data_param
        return p.batch_size, p.shuffle, 0

    def open_source(self):
        p = self.param.npz_data_param
        if not p.source:
            raise self.error("npz_data_param.source is not set")
        return NpzSource(p.source, p.split, p.limit, self.name)
