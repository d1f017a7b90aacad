"""grain transforms for training and evaluation (numpy + PIL; importable by worker processes).

Training (`TrainTransform`), per example: random scale, pad (image 0 after
normalisation, label 255), random crop, optional photometric distortion,
horizontal flip, normalisation. Scale and crop are fused: only the part of the
rescaled image that falls inside the crop is resampled (the image by
OpenCV-style bilinear taps without antialiasing, as the authors' cv2 INTER_LINEAR;
the label by the nearest pixel to each sample's centre), at the same sampling positions as
rescaling the whole image and then cropping, at a fraction of the cost for large
scales. (The two agree up to floating-point rounding: a nearest-neighbour sample
exactly on a pixel boundary may fall on either side, and bilinear values may
differ by a grey level.)

Evaluation (`EvalTransform`): whole images, an optional keep-ratio resize of
the image (the label keeps its original size, as metrics are computed there),
optional padding so that images of different sizes can share a batch.

Both refuse an image and label of different sizes (ValueError naming the example).

This module must not import jax: grain's worker processes unpickle these
transforms and should stay light.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

from ccnet_jax.labels import IGNORE_LABEL
from ccnet_jax.scales import AUTHORS_SCALES

CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How uint8 RGB pixels become model input: reorder channels, subtract mean, divide by std.

    `mean` and `std` are given in the *output* channel order.
    """

    channel_order: str = "bgr"
    mean: tuple[float, float, float] = CAFFE_BGR_MEAN
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB -> float32 (H, W, 3) normalised, in `channel_order`."""
        pixels = rgb.astype(np.float32)
        if self.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        scale = 1.0 / np.asarray(self.std, np.float32)
        return (pixels - mean) * scale

    def invert(self, normalised: np.ndarray) -> np.ndarray:
        """float32 normalised (H, W, 3) -> float32 RGB values in [0, 255] (for visualisation)."""
        pixels = normalised * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return pixels[..., ::-1] if self.channel_order == "bgr" else pixels


CAFFE_BGR = Normalization("bgr", CAFFE_BGR_MEAN, (1.0, 1.0, 1.0))  # the authors': BGR minus the mean, no std
IMAGENET_RGB = Normalization("rgb", IMAGENET_RGB_MEAN, IMAGENET_RGB_STD)  # mmsegmentation's


@dataclasses.dataclass(frozen=True)
class PhotometricConfig:
    """Random colour changes, each applied with probability 1/2 (mmsegmentation's ranges)."""

    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta_degrees: float = 36.0


@dataclasses.dataclass(frozen=True)
class TrainAugmentConfig:
    """Training augmentation.

    Attributes:
      crop_size: (height, width) of every output example.
      scales: random scale drawn from this set (the authors' 0.7, 0.8, ..., 2.1);
      scale_range: if set, the scale is drawn uniformly from [low, high] instead
        (mmsegmentation's ratio range 0.5-2.0).
      base_size: optional (long side, short side) bound: the image is first fitted
        inside it keeping its aspect ratio (mmsegmentation's `img_scale`), and the
        random scale applies on top. None: scales are relative to the stored image.
      flip_prob: probability of a horizontal flip.
      normalization: see `Normalization`; CAFFE_BGR or IMAGENET_RGB.
      photometric: optional colour distortion before normalisation.
    """

    crop_size: tuple[int, int] = (769, 769)
    scales: tuple[float, ...] = AUTHORS_SCALES
    scale_range: tuple[float, float] | None = None
    base_size: tuple[int, int] | None = None
    flip_prob: float = 0.5
    normalization: Normalization = CAFFE_BGR
    photometric: PhotometricConfig | None = None

    def __post_init__(self):
        values = self.scales if self.scale_range is None else self.scale_range
        if not values or min(values) <= 0:
            raise ValueError(f"scales must be positive, got {values}")
        if self.scale_range is not None and (len(self.scale_range) != 2 or self.scale_range[0] > self.scale_range[1]):
            raise ValueError(f"scale_range must be (low, high) with low <= high, got {self.scale_range}")
        if min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")


def fit_factor(height: int, width: int, base_size: tuple[int, int] | None) -> float:
    """Factor fitting (height, width) inside (long, short) keeping the aspect ratio (1 if None)."""
    if base_size is None:
        return 1.0
    long_side, short_side = max(base_size), min(base_size)
    return min(long_side / max(height, width), short_side / min(height, width))


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def _linear_taps(start: int, count: int, step: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR's taps along one axis for output pixels start .. start + count - 1.

    Output pixel d samples source position (d + 0.5) * step - 0.5 (half-pixel centres); a
    position before the first pixel centre, or at or past the last one, takes the edge pixel
    alone. Returns (low, high) int source indices and the float32 weight of `high`.
    """
    positions = (np.arange(start, start + count, dtype=np.float64) + 0.5) * step - 0.5
    low = np.floor(positions)
    frac = positions - low
    low = low.astype(np.int64)
    outside = (low < 0) | (low >= size - 1)
    frac = np.where(outside, 0.0, frac).astype(np.float32)
    low = np.clip(low, 0, size - 1)
    return low, np.minimum(low + 1, size - 1), frac


def _steps(height: int, width: int, size: tuple[int, int], factor: float | None) -> tuple[float, float]:
    """Source pixels per output pixel along (H, W): 1 / factor where the size came from a factor (as
    cv2.resize(None, fx=factor, fy=factor) samples, its size rounded), else source over output."""
    if factor is not None:
        return 1.0 / factor, 1.0 / factor
    return height / size[0], width / size[1]


def _nearest_taps(start: int, count: int, step: float, size: int) -> np.ndarray:
    """The source pixel holding the centre of each output pixel start .. start + count - 1 (the
    last one where a centre falls past the edge, as a factor's rounded-up size can put it)."""
    centres = (np.arange(start, start + count, dtype=np.float64) + 0.5) * step
    return np.minimum(np.floor(centres).astype(np.int64), size - 1)


def bilinear_window(image: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int],
                    factor: float | None = None) -> np.ndarray:
    """The window (top, left, height, width) of uint8 (H, W[, C]) `image` resized to `size`, uint8.

    The authors' cv2.resize(INTER_LINEAR): two taps per axis at half-pixel centres and no
    antialiasing filter when shrinking (PIL's BILINEAR widens its filter by the shrink factor,
    which blurs the 0.7-0.9 scales). Values are rounded to the nearest grey level, as cv2's
    fixed-point arithmetic does (within one level of it). With `factor` (size = round(H·factor),
    round(W·factor)) the step is 1/factor, as the authors' cv2.resize(fx=factor, fy=factor) takes
    it, not H/size: their far edges differ by |size - H·factor| / factor, up to 0.5 / factor
    source pixels (0.42 at 61 rows and 0.7).
    """
    top, left, win_h, win_w = window
    height, width = image.shape[:2]
    step_y, step_x = _steps(height, width, size, factor)
    y0, y1, fy = _linear_taps(top, win_h, step_y, height)
    x0, x1, fx = _linear_taps(left, win_w, step_x, width)
    # Only the source columns the window reads are interpolated along the rows; the arithmetic
    # runs in place on float32 copies (this is the transform's costliest step).
    first, last = int(x0.min()), int(x1.max()) + 1
    source = image[:, first:last]
    rows = np.take(source, y0, axis=0).astype(np.float32)
    lower = np.take(source, y1, axis=0).astype(np.float32)
    lower -= rows
    lower *= fy.reshape((-1,) + (1,) * (image.ndim - 1))
    rows += lower
    out = np.take(rows, x0 - first, axis=1)
    right = np.take(rows, x1 - first, axis=1)
    right -= out
    right *= fx.reshape((1, -1) + (1,) * (image.ndim - 2))
    out += right
    # A convex combination of grey levels: within [0, 255] up to float rounding, which the
    # round-half-up below absorbs.
    out += 0.5
    return np.floor(out, out=out).astype(np.uint8)


def resample_window(
    image: np.ndarray,
    label: np.ndarray | None,
    size: tuple[int, int],
    window: tuple[int, int, int, int],
    factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The window (top, left, height, width) of image/label resized to `size` = (H', W'), which
    `factor` gave where it is passed (see `bilinear_window`).

    Only the window is computed, at the same source positions as a full resize, so
    image and label stay aligned exactly as in resize-then-crop. Image: OpenCV-style
    bilinear without antialiasing (`bilinear_window`, the authors' INTER_LINEAR);
    label: the source pixel holding each output pixel's centre. The
    authors' INTER_NEAREST takes the source pixel at the output pixel's top-left corner
    instead, which puts their labels half a source pixel off their images; this keeps them
    aligned.
    """
    top, left, win_h, win_w = window
    height, width = image.shape[:2]
    if (height, width) == tuple(size):
        crop = (slice(top, top + win_h), slice(left, left + win_w))
        return image[crop], None if label is None else label[crop]
    out_image = bilinear_window(image, size, window, factor)
    out_label = None
    if label is not None:
        step_y, step_x = _steps(height, width, size, factor)
        rows = _nearest_taps(top, win_h, step_y, height)
        cols = _nearest_taps(left, win_w, step_x, width)
        out_label = label[rows[:, None], cols[None, :]]
    return out_image, out_label


def photometric_distort(rgb: np.ndarray, rng: np.random.Generator, config: PhotometricConfig) -> np.ndarray:
    """Random brightness, contrast, saturation and hue on a uint8 (H, W, 3) RGB image."""
    draws = rng.random(5)
    contrast_first = draws[4] < 0.5
    pixels = rgb.astype(np.float32)

    def clip(x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0.0, 255.0)

    if draws[0] < 0.5:
        pixels = clip(pixels + rng.uniform(-config.brightness_delta, config.brightness_delta))
    contrast = rng.uniform(*config.contrast_range) if draws[1] < 0.5 else None
    if contrast is not None and contrast_first:
        pixels = clip(pixels * contrast)
    if draws[2] < 0.5 or draws[3] < 0.5:
        hsv = np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if draws[2] < 0.5:
            hsv[..., 1] = clip(hsv[..., 1] * rng.uniform(*config.saturation_range))
        if draws[3] < 0.5:
            # PIL's hue runs over 0..255 for a full turn.
            shift = rng.uniform(-config.hue_delta_degrees, config.hue_delta_degrees) * 256.0 / 360.0
            hsv[..., 0] = np.mod(hsv[..., 0] + shift, 256.0)
        hsv_image = Image.fromarray(np.round(hsv).clip(0, 255).astype(np.uint8), mode="HSV")
        pixels = np.asarray(hsv_image.convert("RGB")).astype(np.float32)
    if contrast is not None and not contrast_first:
        pixels = clip(pixels * contrast)
    return np.round(pixels).astype(np.uint8)


def checked_size(element: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of an example's image, which its label must share: a pair of different sizes (which the
    shipped builders refuse to prepare) raises a ValueError naming the example, since no resize of one
    onto the other is known to align them."""
    image, label = element["image"], element["label"]
    height, width = image.shape[:2]
    if label.shape != (height, width):
        raise ValueError(f"example {element.get('file_name', '(no file_name)')}: its image is {height}x{width} "
                         f"but its label {label.shape[0]}x{label.shape[1]}; an image and its label must have "
                         "one size (pixel y, x of the label is the class of pixel y, x of the image)")
    return height, width


class TrainTransform(grain.transforms.RandomMap):
    """{"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W), ...} ->
    {"image": float32 (crop_h, crop_w, 3), "label": uint8 (crop_h, crop_w)} (NHWC once batched).

    The image and its label must have one size (see `checked_size`)."""

    def __init__(self, config: TrainAugmentConfig):
        self.config = config

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        config = self.config
        image, label = element["image"], element["label"]
        height, width = checked_size(element)
        if config.scale_range is None:
            scale = float(config.scales[rng.integers(len(config.scales))])
        else:
            scale = float(rng.uniform(*config.scale_range))
        factor = fit_factor(height, width, config.base_size) * scale
        new_h, new_w = scaled_size(height, width, factor)
        crop_h, crop_w = config.crop_size
        # Padding goes to the bottom/right, so the valid part always starts at the crop's corner.
        top = int(rng.integers(max(new_h - crop_h, 0) + 1))
        left = int(rng.integers(max(new_w - crop_w, 0) + 1))
        win_h, win_w = min(crop_h, new_h - top), min(crop_w, new_w - left)
        window_image, window_label = resample_window(image, label, (new_h, new_w), (top, left, win_h, win_w),
                                                     factor)
        if config.photometric is not None:
            window_image = photometric_distort(window_image, rng, config.photometric)
        out_image = np.zeros((crop_h, crop_w, 3), np.float32)
        out_image[:win_h, :win_w] = config.normalization(window_image)
        out_label = np.full((crop_h, crop_w), IGNORE_LABEL, np.uint8)
        out_label[:win_h, :win_w] = window_label
        if rng.random() < config.flip_prob:
            out_image, out_label = out_image[:, ::-1], out_label[:, ::-1]
        return {"image": np.ascontiguousarray(out_image), "label": np.ascontiguousarray(out_label)}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation preprocessing.

    Attributes:
      resize: optional (long side, short side) bound: the image is resized to fit
        it keeping its aspect ratio (e.g. (2048, 512) for ADE20K). The label
        keeps its original size: scores are taken at the label's resolution.
      pad_to: optional (H, W): images are padded (0 after normalisation) at the
        bottom/right to this size, so every batch has one image shape. Without
        it the batcher pads a batch of mixed sizes to its largest image
        (`pipeline.PadBatch`).
      normalization: see `Normalization`.
    """

    resize: tuple[int, int] | None = None
    pad_to: tuple[int, int] | None = None
    normalization: Normalization = CAFFE_BGR


def pad_to_size(array: np.ndarray, size: tuple[int, int], value: float, what: str) -> np.ndarray:
    """`array` (H, W, ...) padded at the bottom/right with `value` to `size`."""
    height, width = array.shape[:2]
    if height > size[0] or width > size[1]:
        raise ValueError(
            f"{what} of {height}x{width} does not fit the padding size {size[0]}x{size[1]}; "
            "raise eval.pad_to, or leave it unset to pad each batch to its largest image"
        )
    if (height, width) == tuple(size):
        return array
    out = np.full((size[0], size[1]) + array.shape[2:], value, dtype=array.dtype)
    out[:height, :width] = array
    return out


class EvalTransform(grain.transforms.Map):
    """{"image", "label", ...} -> {"image": float32 (H', W', 3), "label": uint8 (H, W) as stored,
    "height", "width": int32 size of the image before padding, "label_height", "label_width": int32
    size of the label, other keys unchanged}.

    The image and its label must have one size (H, W) (see `checked_size`); `resize` then fits the
    image, and the label keeps its size.
    """

    def __init__(self, config: EvalConfig):
        self.config = config

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        image, label = element["image"], element["label"]
        height, width = checked_size(element)
        if config.resize is not None:
            new_h, new_w = scaled_size(height, width, fit_factor(height, width, config.resize))
            image, _ = resample_window(image, None, (new_h, new_w), (0, 0, new_h, new_w))
        out = dict(element)
        out["height"], out["width"] = np.int32(image.shape[0]), np.int32(image.shape[1])
        out["label_height"], out["label_width"] = np.int32(height), np.int32(width)
        image = config.normalization(image)
        out["image"] = image if config.pad_to is None else pad_to_size(image, config.pad_to, 0.0, "image")
        out["label"] = label
        return out
