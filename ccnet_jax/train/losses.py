"""Segmentation losses (SPEC §2): cross-entropy with ignore label, OHEM, the DSN sum.

Logits arrive at the network's output stride, NHWC (B, h, w, C), in any float
dtype; labels are (B, H, W) integer train ids with 255 = ignore. Logits are
upsampled bilinearly with align_corners=True semantics (corner pixels map to
corner pixels, as PyTorch's `interpolate(..., align_corners=True)`) to the
label size, and everything after that runs in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IGNORE_LABEL = 255


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


def _true_class_log_probs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(true class) (B, H, W) float32 (0 where ignored) and the valid mask (B, H, W) bool."""
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0), valid


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    # No kept pixel gives 0, not NaN (a crop of pure padding would otherwise poison the step).
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over pixels whose label is not 255; a float32 scalar.

    Args:
      logits: (B, h, w, C), any float dtype; upsampled to the label size.
      labels: (B, H, W) integer class ids, 255 = ignore.
    """
    logits = resize_bilinear(logits, labels.shape[1:3])
    log_p, valid = _true_class_log_probs(logits, labels)
    return _masked_mean(-log_p, valid)


def ohem_threshold(true_probs: jax.Array, valid: jax.Array, thresh: float, min_kept: int) -> jax.Array:
    """The OHEM probability threshold (float32 scalar) over all pixels of the batch.

    threshold = max(thresh, k-th smallest true-class probability of the valid
    pixels), k = min_kept; 1.0 (keep every valid pixel) if min_kept >= the
    number of valid pixels.
    """
    flat = jnp.where(valid, true_probs, 1.0).reshape(-1)
    num_valid = jnp.sum(valid)
    if min_kept <= 0:
        return jnp.float32(thresh)
    kth = jnp.sort(flat)[min(min_kept, flat.size) - 1]
    return jnp.where(min_kept >= num_valid, 1.0, jnp.maximum(jnp.float32(thresh), kth)).astype(jnp.float32)


def ohem_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, thresh: float = 0.7, min_kept: int = 100_000
) -> jax.Array:
    """Online hard example mining cross-entropy (the authors' OhemCrossEntropy2d), float32 scalar.

    Pixels whose true-class probability is above `ohem_threshold(...)` are
    ignored; the mean runs over the rest. The selection is computed over the
    whole (global) batch and is not differentiated.
    """
    logits = resize_bilinear(logits, labels.shape[1:3])
    log_p, valid = _true_class_log_probs(logits, labels)
    probs = jax.lax.stop_gradient(jnp.exp(log_p))
    threshold = ohem_threshold(probs, valid, thresh, min_kept)
    kept = valid & (probs <= threshold)
    return _masked_mean(-log_p, kept)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """main (OHEM or plain CE) + aux_weight * CE(aux)."""

    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    aux_weight: float = 0.4


def segmentation_loss(
    main_logits: jax.Array, aux_logits: jax.Array, labels: jax.Array, config: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CCNet training loss; returns (total, {"main": ..., "aux": ...}), float32 scalars."""
    if config.ohem:
        main = ohem_cross_entropy(main_logits, labels, thresh=config.ohem_thresh, min_kept=config.ohem_min_kept)
    else:
        main = cross_entropy(main_logits, labels)
    aux = cross_entropy(aux_logits, labels)
    return main + config.aux_weight * aux, {"main": main, "aux": aux}
