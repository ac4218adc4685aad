"""Caffe's DataTransformer plus the paper's augmentation, in NumPy on the host.

A batch of HWC images (uint8 or float, RGB or grey) becomes float NCHW, in
the order of TransformationParameter (proto/caffe.proto):

  force_gray / force_color
  isotropic rescale: smaller side -> S (S = scale_min; jittered per image
      S ~ U{scale_min..scale_max} at TRAIN, (scale_min + scale_max) // 2 at TEST)
  zero padding by crop_pad
  - mean_file (an image of the size reached here; subtracting it before the
      crop is Caffe's "mean cropped at the same place")
  crop (random at TRAIN, centre at TEST) and mirror (random, p = 1/2, in both
      phases when mirror is true, as Caffe)
  + PCA colour shift (TRAIN only; AlexNet's lighting noise, see below)
  - mean_value, then * scale

The colour shift adds eigvec @ (alpha * eigval), alpha ~ N(0, color_shift_std)
per image, to the 0..255 pixels. For the shift to be in grey levels, eigval is
255 x the eigenvalues of the RGB covariance of pixels on the 0..1 scale (the
0..255 covariance's eigenvalues / 255): fb.resnet.torch's ImageNet values
0.2175, 0.0188, 0.0045 become 55.46, 4.794, 1.148. compute_pca returns this.

All randomness comes from the numpy Generator passed in, drawn per batch in a
fixed order (S, crop offsets, flips, colour-shift coefficients), so the same
Generator state gives the same batch. Images of one size (the npz case) are
cropped and flipped by gathering from a sliding-window view (also the fastest
way to NCHW); images of different sizes with one slice each. A large batch is
cut into parts that the threads of `map_fn` crop, flip and normalise at once
(every draw is made before, so the batch does not depend on the cut), into an
`out` array the caller may keep between batches (fresh memory costs page
faults: at 64 x 224 x 224 reusing it takes a third off the time).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from ..errors import VggcaffeError
from .image_io import load_mean, resize


def to_gray(x):
    """(..., 3) RGB -> (..., 1) luma, Pillow's "L" formula (ITU-R 601-2) for uint8."""
    if x.dtype == np.uint8:
        r, g, b = (x[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]


PARTS, PART_SIZE = 8, 1 << 18      # a large batch's crops go to at most 8 threads, >= 256 Ki values each


def _channels(batch):
    return batch.shape[-1] if isinstance(batch, np.ndarray) else batch[0].shape[-1]


def _crop_flip(batch, offsets, flips, height, width):
    """Images (N, H, W, C) array or list -> (N, C, height, width): the window at
    offsets[n] = (row, col), mirrored left-right where flips[n]."""
    if not isinstance(batch, np.ndarray):
        return np.stack([im[r:r + height, c:c + width][:, ::-1 if f else 1].transpose(2, 0, 1)
                         for im, (r, c), f in zip(batch, offsets, flips)])
    windows = sliding_window_view(batch, (height, width), axis=(1, 2))              # (N, H', W', C, h, w)
    out = windows[np.arange(len(batch)), offsets[:, 0], offsets[:, 1]]               # (N, C, h, w)
    out[flips] = out[flips, :, :, ::-1]
    return out


class Transformer:
    """Applies one layer's TransformationParameter in a given phase."""

    def __init__(self, param, phase="TRAIN", name="", dtype=np.float32):
        self.param = param
        self.train = phase == "TRAIN"
        self.name = name
        self.dtype = np.dtype(dtype)
        self.scale_range = (param.scale_min, param.scale_max or param.scale_min)
        self.mean_value = np.asarray(param.mean_value, np.float64)
        self.mean_image = None
        self._check(param)
        if param.mean_file:
            self.mean_image = load_mean(param.mean_file).transpose(1, 2, 0)    # (H, W, C)
        self.eigval = np.asarray(param.pca_eigval, np.float64)
        self.eigvec = np.asarray(param.pca_eigvec, np.float64).reshape(-1, 3)  # p_i = eigvec[:, i]

    def error(self, message):
        return VggcaffeError(f"layer '{self.name}' transform_param: {message}")

    def _check(self, p):
        lo, hi = self.scale_range
        if p.scale_max and (not p.scale_min or hi < lo):
            raise self.error(f"scale_max ({hi}) needs 0 < scale_min <= scale_max (scale_min is {lo})")
        if p.mean_file and len(p.mean_value):
            raise self.error("give mean_file or mean_value, not both")
        if p.force_color and p.force_gray:
            raise self.error("force_color and force_gray are exclusive")
        if p.color_shift_std and (len(p.pca_eigval) != 3 or len(p.pca_eigvec) != 9):
            raise self.error("color_shift_std needs 3 pca_eigval and 9 pca_eigvec "
                             f"(got {len(p.pca_eigval)} and {len(p.pca_eigvec)}); see `vggcaffe compute_pca`")

    # --- sizes ----------------------------------------------------------
    def channels(self, c):
        return 1 if self.param.force_gray else 3 if self.param.force_color else c

    def draw_scales(self, n, rng):
        """S per image (n,), or None when there is no rescale."""
        lo, hi = self.scale_range
        if lo == 0:
            return None
        if hi > lo and self.train:
            return rng.integers(lo, hi + 1, size=n)
        return np.full(n, (lo + hi) // 2)

    @staticmethod
    def rescaled_size(height, width, s):
        """(h, w) with the smaller side s and the aspect ratio kept."""
        if height <= width:
            return int(s), max(int(s), int(width * s / height + 0.5))
        return max(int(s), int(height * s / width + 0.5)), int(s)

    def rescale(self, img, s):
        return resize(img, *self.rescaled_size(*img.shape[:2], s), resample=Image.BICUBIC)

    def output_shape(self, height, width, channels):
        """(C, H, W) of the output for an input image of this size (S at its TEST value)."""
        lo, hi = self.scale_range
        if lo:
            height, width = self.rescaled_size(height, width, (lo + hi) // 2)
        size = self.param.crop_size
        pad = 2 * self.param.crop_pad
        return (self.channels(channels),) + ((size, size) if size else (height + pad, width + pad))

    # --- the pipeline ---------------------------------------------------
    def __call__(self, images, rng, names=None, map_fn=map, out=None):
        """images: (N, H, W, C) array or a list of (H, W, C) arrays -> (N, C, h, w) self.dtype.
        names[i] names image i in errors; map_fn (e.g. a thread pool's map) runs the rescales
        and, for large batches, the crops and pixel operations of parts of the batch. The
        result is written into `out` when it has the result's shape and dtype (a pinned
        buffer, say), else into a new array."""
        n = len(images)
        names = names if names is not None else [f"#{i}" for i in range(n)]
        images = self._force_channels(images)
        scales = self.draw_scales(n, rng)
        if scales is not None:
            images = list(map_fn(self.rescale, images, scales))
        batch = self._pad(self._stack_if_one_size(images))
        sizes = np.tile(batch.shape[1:3], (n, 1)) if isinstance(batch, np.ndarray) \
            else np.array([im.shape[:2] for im in batch])
        offsets, (height, width) = self._crop_offsets(sizes, rng, names)
        flips = rng.random(n) < 0.5 if self.param.mirror else np.zeros(n, bool)
        alphas = rng.normal(0.0, self.param.color_shift_std, (n, 3)) \
            if self.train and self.param.color_shift_std > 0 else None
        shape = (n, _channels(batch), height, width)
        shifts = self._colour_shifts(alphas, shape[1])
        if out is None or out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            out = np.empty(shape, self.dtype)

        def part(span):                                 # images i..j-1: no draws, any order
            i, j = span
            x = out[i:j]
            x[...] = _crop_flip(self._subtract_mean_image(batch[i:j], names[i:j]), offsets[i:j], flips[i:j],
                                height, width)
            self._pixel_ops(x, None if shifts is None else shifts[i:j])

        parts = max(1, min(PARTS, out.size // PART_SIZE))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        spans = [(int(i), int(j)) for i, j in zip(bounds[:-1], bounds[1:]) if j > i]
        for _ in (map_fn if len(spans) > 1 else map)(part, spans):
            pass
        return out

    def _force_channels(self, images):
        if not (self.param.force_gray or self.param.force_color):
            return images
        convert = to_gray if self.param.force_gray else (lambda im: np.repeat(im[..., :1], 3, axis=-1))
        wanted = self.channels(0)
        if isinstance(images, np.ndarray):
            return images if images.shape[-1] == wanted else convert(images)
        return [im if im.shape[-1] == wanted else convert(im) for im in images]

    @staticmethod
    def _stack_if_one_size(images):
        if isinstance(images, np.ndarray) or len({im.shape for im in images}) > 1:
            return images
        return np.stack(images)

    def _pad(self, batch):
        p = self.param.crop_pad
        if not p:
            return batch
        if isinstance(batch, np.ndarray):
            return np.pad(batch, ((0, 0), (p, p), (p, p), (0, 0)))
        return [np.pad(im, ((p, p), (p, p), (0, 0))) for im in batch]

    def _crop_offsets(self, sizes, rng, names):
        """Crop windows: offsets (N, 2) and the output (height, width)."""
        size = self.param.crop_size
        if not size:
            if (sizes != sizes[0]).any():
                i = int(np.flatnonzero((sizes != sizes[0]).any(axis=1))[0])
                raise self.error(f"image {names[i]} is {tuple(sizes[i])} but image {names[0]} is "
                                 f"{tuple(sizes[0])} after rescale; set crop_size (or new_height/new_width)")
            return np.zeros_like(sizes), tuple(int(v) for v in sizes[0])
        small = np.flatnonzero((sizes < size).any(axis=1))
        if len(small):
            i = int(small[0])
            raise self.error(f"crop_size {size} does not fit image {names[i]} of size "
                             f"{sizes[i][0]}x{sizes[i][1]} (after rescale and crop_pad)")
        if self.train:
            return rng.integers(0, sizes - size + 1), (size, size)
        return (sizes - size) // 2, (size, size)

    def _subtract_mean_image(self, batch, names):
        if self.mean_image is None:
            return batch
        shapes = [batch.shape[1:]] if isinstance(batch, np.ndarray) else [im.shape for im in batch]
        for name, shape in zip(names, shapes):
            if shape != self.mean_image.shape:
                raise self.error(f"mean_file {self.param.mean_file} is {self.mean_image.shape} (H, W, C) "
                                 f"but image {name} is {shape} where the mean is subtracted")
        if isinstance(batch, np.ndarray):
            return batch - self.mean_image
        return [im - self.mean_image for im in batch]

    def _colour_shifts(self, alphas, c):
        """The PCA colour shift of each image, (N, 3) in self.dtype (None without alphas)."""
        if alphas is None:
            return None
        if c != 3:
            raise self.error(f"the PCA colour shift needs 3 channels, the images have {c}")
        return ((alphas * self.eigval) @ self.eigvec.T).astype(self.dtype)

    def _pixel_ops(self, x, shifts):
        """Colour shift, mean_value and scale on (N, C, h, w), in place."""
        c = x.shape[1]
        if shifts is not None:
            x += shifts[:, :, None, None]
        if len(self.mean_value):
            if len(self.mean_value) not in (1, c):
                raise self.error(f"{len(self.mean_value)} mean_value given for {c}-channel images (need 1 or {c})")
            x -= self.mean_value.astype(x.dtype)[:, None, None]
        if self.param.scale != 1:
            x *= x.dtype.type(self.param.scale)
        return x


def _pixel_blocks(images, chunk):
    blocks = (images[i:i + chunk] for i in range(0, len(images), chunk)) \
        if isinstance(images, np.ndarray) else images
    for block in blocks:
        block = np.asarray(block)
        if block.shape[-1] != 3:
            raise VggcaffeError(f"compute_pca needs RGB images (..., 3), got shape {block.shape}")
        yield block.reshape(-1, 3).astype(np.float64) - 128.0


def compute_pca(images, chunk=256):
    """Eigen-decompose the RGB covariance of all pixels (AlexNet's PCA).

    images: uint8 (N, H, W, 3) on 0..255, or an iterable of (H, W, 3) /
    (n, H, W, 3) arrays. Returns (eigval (3,), descending, >= 0, scaled as
    the colour shift wants: 255 x the eigenvalues for pixels on 0..1; eigvec
    (3, 3) with p_i = eigvec[:, i], each column's sum made positive): the
    values transform_param's pca_eigval / pca_eigvec (row-major) expect.
    """
    count, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    for p in _pixel_blocks(images, chunk):
        count += len(p)
        total += p.sum(axis=0)
        outer += p.T @ p
    if count < 2:
        raise VggcaffeError("compute_pca needs at least 2 pixels")
    mean = total / count
    eigval, eigvec = np.linalg.eigh((outer / count - np.outer(mean, mean)) / 255.0)
    eigval, eigvec = np.clip(eigval[::-1], 0, None), eigvec[:, ::-1]
    eigvec *= np.where(eigvec.sum(axis=0) < 0, -1.0, 1.0)
    return eigval, eigvec


def format_pca(eigval, eigvec):
    """transform_param lines for compute_pca's result."""
    lines = [f"pca_eigval: {v:.6g}" for v in eigval]
    lines += [f"pca_eigvec: {v:.6g}" for v in np.asarray(eigvec).ravel()]
    return "\n".join(lines)
