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
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ccnet_jax.models.resize import resize_bilinear

Apply = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """mode "whole" or "sliding" (crop_size, stride); scales and horizontal flip on top."""

    mode: Literal["whole", "sliding"] = "whole"
    crop_size: tuple[int, int] = (769, 769)
    stride: tuple[int, int] = (513, 513)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self):
        if self.mode not in ("whole", "sliding"):
            raise ValueError(f"eval.mode must be 'whole' or 'sliding', got {self.mode!r}")
        if min(self.crop_size) <= 0 or min(self.stride) <= 0:
            raise ValueError(f"eval.crop_size and eval.stride must be positive, got {self.crop_size}, {self.stride}")
        if self.mode == "sliding" and any(s > c for s, c in zip(self.stride, self.crop_size)):
            # Windows further apart than they are wide leave pixels between them that no window
            # covers, whose averaged logits would be 0/0.
            raise ValueError(f"eval.stride {list(self.stride)} must not exceed eval.crop_size "
                             f"{list(self.crop_size)}, else windows leave gaps; lower eval.stride")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"eval.scales must be positive numbers, got {self.scales}")


def whole_image_logits(apply: Apply, images: jax.Array) -> jax.Array:
    """The network on the whole image, logits resized to the image size: (B, H, W, C) float32."""
    return resize_bilinear(apply(images), images.shape[1:3])


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one axis: every `stride`, the last flush with the edge.

    A window never extends past the image; an image no larger than the crop has
    the single window at 0.
    """
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(count)})


def sliding_window_logits(apply: Apply, images: jax.Array, crop: tuple[int, int], stride: tuple[int, int]) -> jax.Array:
    """Tiles of `crop` every `stride`, each tile's logits resized to the tile and averaged on overlaps.

    images (B, H, W, 3) -> (B, H, W, C) float32, normalised (0 is the mean
    colour). An image smaller than the crop along an axis is padded with zeros at
    its bottom or right to the crop, and only its own pixels' logits are kept, as
    the authors' `predict_sliding` pads each tile: the network always sees whole
    crops. One window the size of the image gives exactly `whole_image_logits`.
    The windows run in a `lax.scan`: the network appears once in the program
    however many windows there are, so compile time and host memory do not grow
    with the image.
    """
    if any(s > c for s, c in zip(stride, crop)):
        # InferenceConfig refuses this too; a direct call would divide the uncovered pixels' 0 by 0.
        raise ValueError(f"sliding_window_logits: stride {tuple(stride)} must not exceed crop {tuple(crop)}, "
                         "else windows leave gaps; lower the stride")
    batch, height, width, channels = images.shape
    if height < crop[0] or width < crop[1]:
        padding = ((0, 0), (0, max(crop[0] - height, 0)), (0, max(crop[1] - width, 0)), (0, 0))
        return sliding_window_logits(apply, jnp.pad(images, padding), crop, stride)[:, :height, :width]
    tile_h, tile_w = crop
    starts = [(top, left) for top in window_starts(height, crop[0], stride[0])
              for left in window_starts(width, crop[1], stride[1])]
    if len(starts) == 1:
        return whole_image_logits(apply, images)
    counts = np.zeros((height, width), np.float32)
    for top, left in starts:
        counts[top : top + tile_h, left : left + tile_w] += 1.0

    def window_logits(start: jax.Array) -> jax.Array:
        tile = jax.lax.dynamic_slice(images, (0, start[0], start[1], 0), (batch, tile_h, tile_w, channels))
        return whole_image_logits(apply, tile)

    classes = jax.eval_shape(window_logits, jnp.zeros(2, jnp.int32)).shape[-1]

    def add_window(total: jax.Array, start: jax.Array) -> tuple[jax.Array, None]:
        at = (0, start[0], start[1], 0)
        logits = window_logits(start)
        return jax.lax.dynamic_update_slice(total, jax.lax.dynamic_slice(total, at, logits.shape) + logits, at), None

    total = jnp.zeros((batch, height, width, classes), jnp.float32)
    total, _ = jax.lax.scan(add_window, total, jnp.asarray(starts, jnp.int32))
    return total / jnp.asarray(counts)[None, :, :, None]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def predict_logits(apply: Apply, images: jax.Array, config: InferenceConfig) -> jax.Array:
    """Logits (B, H, W, C) float32 at the input size, averaged over config.scales and flips.

    A flipped copy runs in the same batch as the image (one network pass per
    scale, not two).
    """
    batch, height, width = images.shape[:3]
    total = None
    for scale in config.scales:
        x = images if scale == 1.0 else resize_bilinear(images, scaled_size(height, width, scale))
        if config.flip:
            x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
        if config.mode == "sliding":
            logits = sliding_window_logits(apply, x, config.crop_size, config.stride)
        else:
            logits = whole_image_logits(apply, x)
        if config.flip:
            logits = logits[:batch] + logits[batch:, :, ::-1]
        logits = resize_bilinear(logits, (height, width))
        total = logits if total is None else total + logits
    return total / (len(config.scales) * (2 if config.flip else 1))
