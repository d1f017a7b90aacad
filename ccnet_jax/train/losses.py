"""Segmentation losses: cross-entropy with ignore label, the authors' OHEM, the DSN sum.

Logits arrive at the network's output stride, NHWC (B, h, w, C), in any float
dtype; labels are (B, H, W) integer train ids with 255 = ignore. Logits are
upsampled bilinearly with align_corners=True semantics (corner pixels map to
corner pixels, as PyTorch's `interpolate(..., align_corners=True)`) to the
label size, and everything after that runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ccnet_jax.config import LossConfig
from ccnet_jax.labels import IGNORE_LABEL
from ccnet_jax.models.resize import resize_bilinear


def _pick_true_class(values: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """values[..., label] (B, H, W) (0 where ignored) of per-class values (B, H, W, C), and the
    valid mask (B, H, W) bool."""
    valid = labels != IGNORE_LABEL
    # A one-hot select rather than a gather: it fuses with the softmax around it, and its
    # gradient is a select too, where a gather's is a scatter-add over the whole
    # (B, H, W, C) map (on a GPU, atomics over 2x769x769x19 float32 per loss).
    classes = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    picked = jnp.sum(jnp.where(classes == labels[..., None].astype(jnp.int32), values, 0.0), axis=-1)
    return jnp.where(valid, picked, 0.0), valid


def _true_class_log_probs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(true class) (B, H, W) float32 (0 where ignored) and the valid mask (B, H, W) bool."""
    return _pick_true_class(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels)


def _nan_where_labels_out_of_range(loss: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    # A label that is neither a class nor 255 would otherwise count as a pixel of zero loss. A
    # jitted loss cannot raise on values, so it turns NaN, as optax's integer-label losses do.
    out_of_range = (labels != IGNORE_LABEL) & ((labels < 0) | (labels >= num_classes))
    return jnp.where(jnp.any(out_of_range), jnp.nan, loss)


def _check_shapes(logits: jax.Array, labels: jax.Array) -> None:
    # Mismatched batches would broadcast silently when one of them is 1: a loss of the wrong images.
    if logits.ndim != 4 or labels.ndim != 3:
        raise ValueError(f"the loss takes logits (B, h, w, C) and labels (B, H, W); got logits of shape "
                         f"{logits.shape} and labels of shape {labels.shape}")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits and labels must hold the same images; got a batch of {logits.shape[0]} logits "
                         f"and {labels.shape[0]} label maps")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids (255 = ignore), got dtype {labels.dtype}")


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    # No kept pixel gives 0, not NaN (a crop of pure padding would otherwise poison the step).
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over pixels whose label is not 255; a float32 scalar.

    Args:
      logits: (B, h, w, C), any float dtype; upsampled to the label size.
      labels: (B, H, W) integer class ids in [0, C), 255 = ignore; any other value makes the loss NaN.
    """
    _check_shapes(logits, labels)
    logits = resize_bilinear(logits, labels.shape[1:3])
    log_p, valid = _true_class_log_probs(logits, labels)
    return _nan_where_labels_out_of_range(_masked_mean(-log_p, valid), labels, logits.shape[-1])


def grouped_cross_entropy(logits: jax.Array, labels: jax.Array, images_per_group: int) -> jax.Array:
    """`cross_entropy` of each group of `images_per_group` consecutive images, averaged over groups.

    The authors' criterion runs on each GPU over its own images, and data parallelism averages
    the GPUs' losses: a group's pixels make one mean, whatever the other groups' ignored pixels.
    Shapes as `cross_entropy`; B must be a multiple of images_per_group.
    """
    _check_shapes(logits, labels)
    batch = labels.shape[0]
    _check_groups(batch, images_per_group)
    grouped = [x.reshape(batch // images_per_group, images_per_group, *x.shape[1:]) for x in (logits, labels)]
    return jnp.mean(jax.vmap(cross_entropy)(*grouped))


def _check_groups(batch: int, images_per_group: int) -> None:
    if images_per_group < 1 or batch % images_per_group:
        raise ValueError(f"OHEM groups of {images_per_group} images do not divide a batch of {batch}; set "
                         "train.ohem_images_per_group to a divisor of the batch (the authors use 2)")


OHEM_ZOOM = 8  # the authors search the threshold on a 1/8 copy of the probabilities


def _zoomed_size(size: int) -> int:
    """scipy.ndimage.zoom's output size for a zoom of 1/OHEM_ZOOM."""
    return max(1, int(round(size / OHEM_ZOOM)))


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output position of scipy's order-0 zoom (aligned corners, round half up)."""
    if out_size == 1:
        return np.zeros(1, np.int32)
    positions = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
    return np.minimum(np.floor(positions + 0.5), in_size - 1).astype(np.int32)


def ohem_threshold(probs: jax.Array, labels: jax.Array, thresh: float, min_kept: int) -> jax.Array:
    """The authors' OHEM threshold (float32 scalar) for one group of images.

    probs: (g, H, W, C) softmax probabilities at the label size; labels (g, H, W),
    255 = ignore. As in their OhemCrossEntropy2d, the search runs on a 1/8 copy:
    probabilities zoomed bilinearly (aligned corners, scipy's order 1), labels by
    nearest (order 0), and min_kept // 64 pixels. Among the copy's valid pixels
    it takes the true-class probability: threshold = max(thresh, the k-th
    smallest, k = min_kept // 64; thresh when k = 0), or 1.0 (keep every valid
    pixel) when k is at least the number of valid pixels.
    """
    _, height, width, _ = probs.shape
    small_h, small_w = _zoomed_size(height), _zoomed_size(width)
    small = resize_bilinear(probs, (small_h, small_w))  # aligned corners, as scipy's order-1 zoom
    small_labels = labels[:, _nearest_indices(height, small_h)][:, :, _nearest_indices(width, small_w)]
    true_probs, valid = _pick_true_class(small, small_labels)
    kept = min_kept // (OHEM_ZOOM * OHEM_ZOOM)
    num_valid = jnp.sum(valid)
    threshold = jnp.float32(thresh)
    if kept > 0:  # their `if min_kept > 0`: with none to keep, the threshold stays at thresh
        kth = jnp.sort(jnp.where(valid, true_probs, jnp.inf).reshape(-1))[min(kept, true_probs.size) - 1]
        threshold = jnp.maximum(threshold, kth)
    return jnp.where(kept >= num_valid, 1.0, threshold).astype(jnp.float32)


def ohem_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    images_per_group: int = 2,
) -> jax.Array:
    """Online hard example mining cross-entropy (the authors' OhemCrossEntropy2d), float32 scalar.

    The authors run OHEM inside the model on each GPU: every group of
    `images_per_group` images (their per-GPU batch, 2) finds its own threshold
    (`ohem_threshold`) with `min_kept` for the group; pixels whose true-class
    probability is above it are ignored, and the group's loss is the mean over
    the rest. The loss is the mean over groups, so it does not depend on how
    many devices the batch is spread over. The selection is not differentiated.

    logits (B, h, w, C), upsampled to the label size; labels (B, H, W) uint8
    class ids in [0, C) or 255 (any other value makes the loss NaN); B must be
    a multiple of images_per_group.
    """
    _check_shapes(logits, labels)
    batch = labels.shape[0]
    _check_groups(batch, images_per_group)
    logits = resize_bilinear(logits, labels.shape[1:3])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_p, valid = _pick_true_class(log_probs, labels)
    probs = jax.lax.stop_gradient(jnp.exp(log_probs))
    true_probs = jax.lax.stop_gradient(jnp.exp(log_p))

    def group_loss(probs, labels, log_p, true_probs, valid):
        kept = valid & (true_probs <= ohem_threshold(probs, labels, thresh, min_kept))
        return _masked_mean(-log_p, kept)

    grouped = [x.reshape(batch // images_per_group, images_per_group, *x.shape[1:])
               for x in (probs, labels, log_p, true_probs, valid)]
    loss = jnp.mean(jax.vmap(group_loss)(*grouped))
    return _nan_where_labels_out_of_range(loss, labels, logits.shape[-1])


def segmentation_loss(
    main_logits: jax.Array, aux_logits: jax.Array, labels: jax.Array, config: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CCNet training loss; returns (total, {"main": ..., "aux": ...}), float32 scalars.

    With OHEM, both terms are taken per group of config.ohem_images_per_group images and
    averaged over groups, as the authors' CriterionOhemDSN runs on each GPU's images. Without
    it, each term is the mean over the batch's valid pixels.
    """
    if config.ohem:
        main = ohem_cross_entropy(main_logits, labels, thresh=config.ohem_thresh, min_kept=config.ohem_min_kept,
                                  images_per_group=config.ohem_images_per_group)
        aux = grouped_cross_entropy(aux_logits, labels, config.ohem_images_per_group)
    else:
        main = cross_entropy(main_logits, labels)
        aux = cross_entropy(aux_logits, labels)
    return main + config.aux_weight * aux, {"main": main, "aux": aux}


def micro_batch_weights(labels: jax.Array, loss_config: LossConfig) -> jax.Array:
    """(count,) float32 weights of the micro-batches' losses and gradients, for labels (count, B / count,
    H, W): so that their weighted sum is the whole batch's loss. With OHEM the loss is a mean over
    groups of images, which micro-batches hold whole: equal weights (a micro-batch's groups pair
    images i and i + count rather than neighbours: another grouping of shuffled images). Without
    it, each micro-batch's loss is a mean over its valid pixels, the batch's over all of them:
    weights in proportion to the valid pixels (a micro-batch with none has weight 0)."""
    count = labels.shape[0]
    if loss_config.ohem:
        return jnp.full((count,), 1.0 / count, jnp.float32)
    valid = jnp.sum(labels != IGNORE_LABEL, axis=tuple(range(1, labels.ndim))).astype(jnp.float32)
    return valid / jnp.maximum(jnp.sum(valid), 1.0)
