"""Segmentation inference: whole image, sliding window, multi-scale and flip, all in one jit.

`apply(images)` is any function (B, h, w, 3) float32 NHWC -> main logits at the
output stride (B, h', w', C). Every variant returns float32 logits (B, H, W, C)
at the input size; with several scales/flips the logits are averaged (as the
authors' evaluate.py does), each first resized back to the input size.
Resizes are bilinear with aligned corners (scipy `zoom(order=1)` for images,
`interpolate(align_corners=True)` for logits, as in the authors' code).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from ccnet_jax.train.losses import resize_bilinear

Apply = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """mode "whole" or "sliding" (crop_size, stride); scales and horizontal flip on top."""

    mode: str = "whole"
    crop_size: tuple[int, int] = (769, 769)
    stride: tuple[int, int] = (513, 513)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self):
        if self.mode not in ("whole", "sliding"):
            raise ValueError(f"eval.mode must be 'whole' or 'sliding', got {self.mode!r}")
        if min(self.crop_size) <= 0 or min(self.stride) <= 0:
            raise ValueError(f"eval.crop_size and eval.stride must be positive, got {self.crop_size}, {self.stride}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"eval.scales must be positive numbers, got {self.scales}")


def whole_image_logits(apply: Apply, images: jax.Array) -> jax.Array:
    """The network on the whole image, logits resized to the image size: (B, H, W, C) float32."""
    return resize_bilinear(apply(images), images.shape[1:3])


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one axis: every `stride`, the last flush with the edge.

    A window never extends past the image: when the image is smaller than the
    crop, the single window is the image itself.
    """
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(count)})


def sliding_window_logits(apply: Apply, images: jax.Array, crop: tuple[int, int], stride: tuple[int, int]) -> jax.Array:
    """Tiles of `crop` every `stride`, each tile's logits resized to the tile and averaged on overlaps.

    images (B, H, W, 3) -> (B, H, W, C) float32. One window covering the image
    gives exactly `whole_image_logits`.
    """
    _, height, width, _ = images.shape
    tile_h, tile_w = min(crop[0], height), min(crop[1], width)
    total = None
    counts = jnp.zeros((1, height, width, 1), jnp.float32)
    for top in window_starts(height, crop[0], stride[0]):
        for left in window_starts(width, crop[1], stride[1]):
            tile = images[:, top : top + tile_h, left : left + tile_w]
            logits = whole_image_logits(apply, tile)
            if total is None:
                total = jnp.zeros(images.shape[:3] + logits.shape[3:], jnp.float32)
            total = total.at[:, top : top + tile_h, left : left + tile_w].add(logits)
            counts = counts.at[:, top : top + tile_h, left : left + tile_w].add(1.0)
    return total / counts


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def predict_logits(apply: Apply, images: jax.Array, config: InferenceConfig) -> jax.Array:
    """Logits (B, H, W, C) float32 at the input size, averaged over config.scales and flips."""
    height, width = images.shape[1:3]
    flips: Sequence[bool] = (False, True) if config.flip else (False,)
    total = None
    for scale in config.scales:
        scaled = images if scale == 1.0 else resize_bilinear(images, scaled_size(height, width, scale))
        for flip in flips:
            x = scaled[:, :, ::-1] if flip else scaled
            if config.mode == "sliding":
                logits = sliding_window_logits(apply, x, config.crop_size, config.stride)
            else:
                logits = whole_image_logits(apply, x)
            if flip:
                logits = logits[:, :, ::-1]
            logits = resize_bilinear(logits, (height, width))
            total = logits if total is None else total + logits
    return total / (len(config.scales) * len(flips))
