"""What one pixel attends to after one and two criss-cross recurrences, and its picture.

With A_r the (hw x hw) attention of recurrence r (non-zero only on each
pixel's criss-cross), the pixel p reaches after one step the row A_1[p] (its
cross) and after two steps (A_2 A_1)[p]: every pixel of the image, through the
crosses of the pixels on p's cross. Only the attention path is followed (the
residual connection and the value projections are left out), as in the
paper's attention figures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from PIL import Image

from ccnet_jax.evaluation.writers import side_by_side
from ccnet_jax.models import CCNet


def cross_map(a_col: jax.Array, a_row: jax.Array, pixel: tuple[int, int]) -> jax.Array:
    """(h, w) weights of pixel (i, j) over its criss-cross from one image's maps a_col (h, w, h), a_row (h, w, w)."""
    i, j = pixel
    weights = jnp.zeros(a_col.shape[:2], jnp.float32)
    weights = weights.at[:, j].add(a_col[i, j])
    return weights.at[i, :].add(a_row[i, j])


def compose(weights: jax.Array, a_col: jax.Array, a_row: jax.Array) -> jax.Array:
    """(weights A)[q] for a weight map (h, w) over pixels u and one step's maps: (h, w)."""
    along_rows = jnp.einsum("ij,ijw->iw", weights, a_row)
    along_cols = jnp.einsum("ij,ijh->hj", weights, a_col)
    return along_rows + along_cols


def feature_pixel(
    pixel: tuple[int, int], image_size: tuple[int, int], feature_size: tuple[int, int]
) -> tuple[int, int]:
    """Image pixel (y, x) -> the feature-map pixel whose aligned-corner position is nearest."""
    return tuple(
        int(round(p * (f - 1) / max(s - 1, 1))) for p, s, f in zip(pixel, image_size, feature_size)
    )


def recurrence_maps(
    model: CCNet, image: jax.Array, pixel: tuple[int, int]
) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    """Attention of `pixel` (image coordinates) after one and two recurrences of the head's CCA.

    image: (1, H, W, 3) float32 normalised; model in eval mode with
    `config.attention == "cca"`. Returns (step1 (h, w), step2 (h, w)) float32
    maps at the output stride (each sums to 1) and the feature pixel.
    For a model trained with R < 2 the second map shows what a second
    application of its CCA would reach.
    """
    if model.config.attention != "cca":
        raise ValueError(f"attention maps need a criss-cross model; this one has attention={model.config.attention!r}")
    _, features = model.backbone(image)
    y0 = model.head.conva(features)
    col1, row1 = model.head.cca.attention_map(y0)
    y1 = model.head.cca(y0)
    col2, row2 = model.head.cca.attention_map(y1)
    where = feature_pixel(pixel, image.shape[1:3], y0.shape[1:3])
    step1 = cross_map(col1[0], row1[0], where)
    step2 = compose(cross_map(col2[0], row2[0], where), col1[0], row1[0])
    return step1, step2, where


def jitted_recurrence_maps(model_fn):
    """`maps(params, batch_stats, image, pixel) -> (step1, step2)`: `recurrence_maps` of the model
    that model_fn(params, batch_stats) builds, jitted (one compilation per pixel and image size)."""

    @functools.partial(jax.jit, static_argnums=3)
    def maps(params, batch_stats, image, pixel):
        return recurrence_maps(model_fn(params, batch_stats), image, pixel)[:2]

    return maps


def heat_overlay(rgb: np.ndarray, weights: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """uint8 (H, W, 3) picture: `weights` (h, w) scaled to [0, 1] by its maximum, coloured
    with 'inferno', resized to the image and blended over `rgb`."""
    height, width = rgb.shape[:2]
    peak = float(weights.max())
    scaled = weights / peak if peak > 0 else weights
    heat = Image.fromarray((scaled * 255).astype(np.uint8)).resize((width, height), Image.NEAREST)
    colours = colormaps["inferno"](np.asarray(heat) / 255.0)[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)


def mark(rgb: np.ndarray, pixel: tuple[int, int], colour=(0, 255, 255), radius: int = 3) -> np.ndarray:
    """A copy of `rgb` with a small cross drawn at pixel (y, x)."""
    out = rgb.copy()
    y, x = pixel
    height, width = out.shape[:2]
    out[y, max(x - radius, 0) : min(x + radius + 1, width)] = colour
    out[max(y - radius, 0) : min(y + radius + 1, height), x] = colour
    return out


def attention_panels(rgb: np.ndarray, step1: np.ndarray, step2: np.ndarray, pixel: tuple[int, int]) -> np.ndarray:
    """uint8 picture: `rgb` with `pixel` marked, then the pixel's attention after one and two
    recurrences (`recurrence_maps`) over it, side by side."""
    return side_by_side([
        mark(rgb, pixel),
        mark(heat_overlay(rgb, np.asarray(step1)), pixel),
        mark(heat_overlay(rgb, np.asarray(step2)), pixel),
    ])


def choose_pixel(label: np.ndarray, prefer: tuple[int, ...] = ()) -> tuple[int, int]:
    """A pixel to show: the one of a `prefer` class nearest to those pixels' centroid, else the centre."""
    mask = np.isin(label, prefer) if prefer else np.zeros(label.shape, bool)
    if not mask.any():
        return label.shape[0] // 2, label.shape[1] // 2
    ys, xs = np.nonzero(mask)
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(ys[nearest]), int(xs[nearest])
