"""Evaluation over a split: jitted prediction + confusion matrix per batch, summed on the host."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccnet_jax.durations import format_duration
from ccnet_jax.evaluation.inference import InferenceConfig, predict_logits
from ccnet_jax.evaluation.metrics import confusion_matrix
from ccnet_jax.labels import IGNORE_LABEL
from ccnet_jax.models.parts import ModelParts, replicated
from ccnet_jax.models.resize import resize_valid_bilinear
from ccnet_jax.preemption import EvaluationStopped, StopTogether

PredictFn = Callable[[Any, Any, dict[str, Any]], tuple[jax.Array, jax.Array]]

# What prediction reads of an evaluation batch (see ccnet_jax.data.pipeline).
BATCH_INPUTS = ("image", "label", "height", "width", "label_height", "label_width")


class NoLabelsError(ValueError):
    """An evaluation that counted no pixel: every label pixel was the ignore label (a split without
    labels, such as Cityscapes test), so there is no IoU to give."""


def make_predict_fn(
    parts: ModelParts, config: InferenceConfig, num_classes: int, mesh: Mesh, data_axis: str = "data"
) -> PredictFn:
    """`fn(params, batch_stats, batch) -> (predictions, confusion)`, jitted over `mesh`.

    batch: an evaluation batch sharded over the data axis: "image" (B, h, w, 3)
    float32, valid in its first "height" x "width" pixels (the rest is padding),
    "label" (B, H, W) uint8, valid in its first "label_height" x "label_width".
    Each image's valid logits are resized onto its label's valid size (the label's
    own resolution, whatever the image was resized or padded to), so predictions
    int32 (B, H, W) and the confusion (C, C) int32, summed over the global batch,
    are in label coordinates; padding pixels have label 255 and count nowhere.
    """

    def predict(params, batch_stats, batch):
        model = parts.model(params, batch_stats, train=False)
        logits = predict_logits(lambda x: model(x)[0], batch["image"], config)
        if logits.shape[-1] != num_classes:
            # Class ids past num_classes would land in another true class's row of the confusion matrix.
            raise ValueError(f"the model predicts {logits.shape[-1]} classes but num_classes is {num_classes}; "
                             "pass the model's class count (config.model.num_classes)")
        labels = batch["label"]
        image_sizes = jnp.stack([batch["height"], batch["width"]], axis=-1)
        label_sizes = jnp.stack([batch["label_height"], batch["label_width"]], axis=-1)
        logits = resize_valid_bilinear(logits, image_sizes, labels.shape[1:3], label_sizes)
        predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return predictions, confusion_matrix(predictions, labels, num_classes)

    data = NamedSharding(mesh, PartitionSpec(data_axis))
    repl = replicated(mesh)
    jitted = jax.jit(predict, in_shardings=(repl, repl, data), out_shardings=(data, repl))

    def predict_batch(params, batch_stats, batch):
        return jitted(params, batch_stats, {key: batch[key] for key in BATCH_INPUTS})

    return predict_batch


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in batch order, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = {}
    for shard in array.addressable_shards:
        shards[shard.index[0].start or 0] = np.asarray(shard.data)
    return np.concatenate([shards[start] for start in sorted(shards)])


def evaluate(
    predict: PredictFn,
    params: Any,
    batch_stats: Any,
    batches: Iterable[dict[str, Any]],
    num_classes: int,
    *,
    on_batch: Callable[[dict[str, Any], np.ndarray], None] | None = None,
    total: int | None = None,
    log_every: int = 10,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The dataset-level confusion matrix (num_classes, num_classes) int64 over `batches`.

    `on_batch(batch, local_predictions)` sees every batch with this process's
    int32 (b, H, W) predictions (e.g. to write pictures); padding rows have
    batch["valid"] False and labels of 255, so they count nowhere; if it raises on some processes
    of a multi-process run, the others raise ProcessFailed after the same batch. `stop()` is
    checked after every batch; when true, EvaluationStopped is raised. NoLabelsError (a ValueError)
    is raised after the last batch if no pixel was counted (on_batch has seen every batch).
    """
    confusion = np.zeros((num_classes, num_classes), np.int64)
    start = time.perf_counter()
    index = 0
    of = f"/{total}" if total else ""
    for index, batch in enumerate(batches, 1):
        predictions, counts = predict(params, batch_stats, batch)
        confusion += np.asarray(counts, np.int64)
        if on_batch is not None:
            # A picture writer may fail on one host only (its disk is full): all stop after this batch.
            with StopTogether(f"handling evaluation batch {index}{of}"):
                on_batch(batch, local_rows(predictions))
        if jax.process_index() == 0 and (index % log_every == 0 or index == total):
            rate = index / (time.perf_counter() - start)
            eta = f"  ETA {format_duration((total - index) / rate)}" if total and rate > 0 else ""
            print(f"eval batch {index}{of}  {rate:.2f} batches/s{eta}", file=sys.stderr, flush=True)
        if stop is not None and stop():
            raise EvaluationStopped(f"evaluation stopped after batch {index}{of}")
    if not confusion.any():
        # Its mIoU would be NaN (mean_iou's convention for no defined class), which reads like a result.
        raise NoLabelsError(f"no labelled pixel in the {index} evaluated batch{'' if index == 1 else 'es'}: every "
                            f"label pixel is the ignore label {IGNORE_LABEL}, as in a split without labels "
                            "(Cityscapes test), so there is no IoU to compute; evaluate a split with labels "
                            "(data.eval_split)")
    return confusion
