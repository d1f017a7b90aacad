"""Bilinear resizing of NHWC maps with aligned corners (corner pixels map to corner pixels, as
PyTorch's `interpolate(..., align_corners=True)`): logits to label size in the losses and at
evaluation, and image rescaling for multi-scale inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interpolation_matrix(in_size: int, out_size: int) -> jax.Array:
    """(out_size, in_size) float32 weights of 1-D linear interpolation with aligned corners.

    Output position o samples input position o * (in - 1) / (out - 1); each row
    has at most two non-zero weights summing to 1.
    """
    if out_size == 1 or in_size == 1:
        positions = jnp.zeros((out_size,), jnp.float32)
    else:
        positions = jnp.arange(out_size, dtype=jnp.float32) * ((in_size - 1) / (out_size - 1))
    low = jnp.clip(jnp.floor(positions).astype(jnp.int32), 0, in_size - 1)
    high = jnp.minimum(low + 1, in_size - 1)
    frac = positions - low.astype(jnp.float32)
    rows = jnp.arange(out_size)
    matrix = jnp.zeros((out_size, in_size), jnp.float32)
    matrix = matrix.at[rows, low].add(1.0 - frac)
    return matrix.at[rows, high].add(frac)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC `x` (B, h, w, C) to (B, H, W, C) with align_corners=True, in float32.

    Written as two small matrix products, which differentiate cheaply and also
    serve for image rescaling at evaluation (scipy's `zoom(order=1)`, the
    authors' multi-scale resize, aligns corners the same way).
    """
    height, width = size
    x = x.astype(jnp.float32)
    if x.shape[1:3] == (height, width):
        return x
    rows = interpolation_matrix(x.shape[1], height)
    cols = interpolation_matrix(x.shape[2], width)
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)


def _valid_taps(in_valid: jax.Array, out_valid: jax.Array, out_size: int, first: jax.Array | int = 0):
    """Per output position first, ..., first + out_size - 1 of one axis: (low, high) input
    indices, the weight of `high`, and whether the position is valid, mapping the first
    `in_valid` inputs onto the first `out_valid` outputs with aligned corners (traced counts
    and start, static size)."""
    in_valid = jnp.asarray(in_valid, jnp.float32)
    out_valid = jnp.asarray(out_valid, jnp.float32)
    step = jnp.where(out_valid > 1, (in_valid - 1) / jnp.maximum(out_valid - 1, 1), 0.0)
    indices = first + jnp.arange(out_size)
    positions = indices.astype(jnp.float32) * step
    low = jnp.clip(jnp.floor(positions), 0, in_valid - 1)
    high = jnp.minimum(low + 1, in_valid - 1)
    live = indices < out_valid
    return low.astype(jnp.int32), high.astype(jnp.int32), jnp.where(live, positions - low, 0.0), live


def _resize_axis(x: jax.Array, in_sizes: jax.Array, out_sizes: jax.Array, size: int, axis: int) -> jax.Array:
    low, high, frac, live = jax.vmap(_valid_taps, in_axes=(0, 0, None))(in_sizes, out_sizes, size)
    shape = [x.shape[0], 1, 1, 1]
    shape[axis] = size

    def along(v):
        return v.reshape(shape)

    picked_low = jnp.take_along_axis(x, along(low), axis=axis)
    picked_high = jnp.take_along_axis(x, along(high), axis=axis)
    out = picked_low + (picked_high - picked_low) * along(frac)
    return jnp.where(along(live), out, 0.0)


def resize_valid_bilinear(
    x: jax.Array, in_sizes: jax.Array, size: tuple[int, int], out_sizes: jax.Array
) -> jax.Array:
    """Per image, the valid top-left region of NHWC `x` resized onto the valid region of the output.

    x: (B, h, w, C), image i valid in its first in_sizes[i] = (rows, cols); returns
    (B, *size, C) float32 whose first out_sizes[i] rows and columns hold the bilinear
    (aligned-corners) resize of that region, and zeros elsewhere. in_sizes, out_sizes:
    (B, 2) int32, e.g. a padded batch of images and their labels' own sizes. Two taps per
    output per axis, gathered: O(B·H·W·C), however large the maps.
    """
    x = x.astype(jnp.float32)
    x = _resize_axis(x, in_sizes[:, 0], out_sizes[:, 0], size[0], axis=1)
    return _resize_axis(x, in_sizes[:, 1], out_sizes[:, 1], size[1], axis=2)


def argmax_resized(logits: jax.Array, size: tuple[int, int], valid: jax.Array, band_rows: int = 32) -> jax.Array:
    """int32 (H, W) = size: the class of largest logit at each pixel of one image's logits (h, w, C)
    resized bilinearly (aligned corners, as `resize_valid_bilinear`) onto the first valid =
    (rows, cols) pixels, int32 (2,); 0 outside them.

    The output is made `band_rows` rows at a time (H must be a multiple of it), so memory grows
    with band_rows·W·C rather than H·W·C: 150 classes over a 12-megapixel photo would be 7 GB of
    float32. Padding `size` up and passing the true size as `valid` keeps compilations few.
    """
    height, width = size
    if height % band_rows:
        raise ValueError(f"argmax_resized: the output height {height} is not a multiple of band_rows={band_rows}; "
                         "pad the size up and pass the true one as `valid`")
    in_h, in_w, _ = logits.shape
    logits = logits.astype(jnp.float32)
    col_low, col_high, col_frac, col_live = _valid_taps(in_w, valid[1], width)

    def band(first):
        low, high, frac, live = _valid_taps(in_h, valid[0], band_rows, first)
        rows = logits[low] + (logits[high] - logits[low]) * frac[:, None, None]
        out = rows[:, col_low] + (rows[:, col_high] - rows[:, col_low]) * col_frac[None, :, None]
        ids = jnp.argmax(out, axis=-1).astype(jnp.int32)
        return jnp.where(live[:, None] & col_live[None, :], ids, 0)

    return jax.lax.map(band, jnp.arange(0, height, band_rows)).reshape(height, width)
