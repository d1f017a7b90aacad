"""Dataset-level confusion matrix, per-class IoU and mIoU.

IoU_c = TP_c / (TP_c + FP_c + FN_c) from a confusion matrix accumulated over
the whole split (not averaged per image). A class that never occurs in the
labels nor in the predictions has no IoU (NaN) and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """(num_classes, num_classes) int32 counts, rows = true class, columns = predicted class.

    predictions, labels: integer arrays of one shape, e.g. (B, H, W); labels
    outside [0, num_classes) (255 = ignore, padding) are not counted. Predictions
    must lie in [0, num_classes): called on arrays, it raises a ValueError on one
    that does not (where a label is counted); under jit it cannot look at values,
    and such a pixel counts nowhere, as the matrix has no column for it.
    """
    if predictions.shape != labels.shape:
        # Mismatched maps fail deep inside bincount, or where they broadcast pair pixels that do not correspond.
        raise ValueError(f"confusion_matrix: predictions {tuple(predictions.shape)} and labels "
                         f"{tuple(labels.shape)} must have one shape; resize the logits onto the labels "
                         "before the argmax (ccnet_jax.models.resize.resize_bilinear)")
    labels = labels.astype(jnp.int32)
    predictions = predictions.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    predicted = (predictions >= 0) & (predictions < num_classes)
    if not isinstance(predictions, jax.core.Tracer) and not isinstance(labels, jax.core.Tracer):
        _check_predictions(np.asarray(predictions), np.asarray(valid & ~predicted), num_classes)
    # Unmasked, such a prediction lands in another cell: with C = 3, label 1 and prediction 5
    # make index 8, a true positive of class 2.
    counted = valid & predicted
    index = jnp.where(counted, labels * num_classes + predictions, 0)
    counts = jnp.bincount(index.reshape(-1), weights=counted.reshape(-1).astype(jnp.int32), length=num_classes**2)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def _check_predictions(predictions: np.ndarray, outside: np.ndarray, num_classes: int) -> None:
    if outside.any():
        values = np.unique(predictions[outside])
        raise ValueError(f"confusion_matrix: {int(outside.sum())} pixel(s) predicted outside the {num_classes} "
                         f"classes [0, {num_classes}), e.g. {values[:5].tolist()}; pass class ids (the argmax "
                         "over the logits' last axis) and the model's class count")


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """float64 (C,) IoU per class; NaN for classes absent from both labels and predictions."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def mean_iou(confusion: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """Mean of the defined per-class IoUs (optionally over a subset of classes); NaN if none is defined.

    A class absent from both labels and predictions is left out of the mean, as mmsegmentation
    does; the CCNet authors' evaluate.py counts it as 0 over all classes instead. On the whole
    Cityscapes val set every class occurs, so the two agree; on a prefix of it
    (`eval.max_images`) this mean is the higher.
    """
    iou = class_iou(confusion)
    if classes is not None:
        iou = iou[list(classes)]
    iou = iou[~np.isnan(iou)]
    return float(iou.mean()) if iou.size else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    confusion = np.asarray(confusion, np.float64)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def format_table(confusion: np.ndarray, class_names: Sequence[str]) -> str:
    """A per-class IoU table followed by pixel accuracy; the caller prints the `mIoU:` line."""
    iou = class_iou(confusion)
    width = max(len("class"), len("pixel accuracy"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'pixels':>10}"]
    pixels = np.asarray(confusion).sum(1)
    for name, value, count in zip(class_names, iou, pixels):
        shown = "    n/a" if np.isnan(value) else f"{value:7.4f}"
        lines.append(f"{name:<{width}}  {shown}  {int(count):>10d}")
    lines.append(f"{'pixel accuracy':<{width}}  {pixel_accuracy(confusion):7.4f}")
    return "\n".join(lines)
