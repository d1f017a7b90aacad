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


def valid_interpolation_matrix(in_valid: jax.Array, out_valid: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """(out_size, in_size) weights mapping the first `in_valid` of `in_size` positions onto the first
    `out_valid` of `out_size` with aligned corners; rows past `out_valid` are zero. The valid counts
    may be traced (int32 scalars), the sizes are static."""
    in_valid = in_valid.astype(jnp.float32)
    out_valid = out_valid.astype(jnp.float32)
    step = jnp.where(out_valid > 1, (in_valid - 1) / jnp.maximum(out_valid - 1, 1), 0.0)
    positions = jnp.arange(out_size, dtype=jnp.float32) * step
    low = jnp.clip(jnp.floor(positions), 0, in_valid - 1)
    high = jnp.minimum(low + 1, in_valid - 1)
    frac = positions - low
    inputs = jnp.arange(in_size, dtype=jnp.float32)[None, :]
    matrix = (inputs == low[:, None]) * (1.0 - frac)[:, None] + (inputs == high[:, None]) * frac[:, None]
    live = jnp.arange(out_size) < out_valid
    return jnp.where(live[:, None], matrix, 0.0)


def resize_valid_bilinear(
    x: jax.Array, in_sizes: jax.Array, size: tuple[int, int], out_sizes: jax.Array
) -> jax.Array:
    """Per image, the valid top-left region of NHWC `x` resized onto the valid region of the output.

    x: (B, h, w, C), image i valid in its first in_sizes[i] = (rows, cols); returns
    (B, *size, C) float32 whose first out_sizes[i] rows and columns hold the bilinear
    (aligned-corners) resize of that region, and zeros elsewhere. in_sizes, out_sizes:
    (B, 2) int32, e.g. a padded batch of images and their labels' own sizes.
    """
    x = x.astype(jnp.float32)
    matrices = jax.vmap(valid_interpolation_matrix, in_axes=(0, 0, None, None))
    rows = matrices(in_sizes[:, 0], out_sizes[:, 0], x.shape[1], size[0])
    cols = matrices(in_sizes[:, 1], out_sizes[:, 1], x.shape[2], size[1])
    x = jnp.einsum("boh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bpw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)
