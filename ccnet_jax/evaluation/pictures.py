"""The pictures of one evaluated image: prediction beside image and label, and a pixel's attention.

`ccnet predict` writes them as PNGs; training puts them in TensorBoard after
each evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from PIL import Image

from ccnet_jax.data.transforms import Normalization
from ccnet_jax.evaluation import attention
from ccnet_jax.evaluation.writers import colorize, side_by_side


@dataclasses.dataclass(frozen=True)
class EvaluatedImage:
    """One row of an evaluation batch, without its padding."""

    name: str
    image: np.ndarray  # (1, h, w, 3) float32: the network's input (resized if eval_resize, unpadded)
    rgb: np.ndarray  # (h, w, 3) uint8: that input as a picture
    label: np.ndarray  # (H, W) uint8 train ids at the label's own size
    prediction: np.ndarray  # (H, W) int32 in label coordinates


def evaluated_image(batch: dict[str, Any], predictions: np.ndarray, row: int, normalization: Normalization,
                    rows: Callable[[Any], np.ndarray] = np.asarray) -> EvaluatedImage:
    """Row `row` of `batch` (an evaluation batch) and its `predictions` (this process's rows).
    `rows` turns a batch entry into this process's numpy rows (`evaluate.local_rows` for global arrays)."""
    height, width, label_height, label_width = (int(rows(batch[key])[row])
                                                for key in ("height", "width", "label_height", "label_width"))
    image = rows(batch["image"])[row : row + 1, :height, :width]
    return EvaluatedImage(
        name=str(batch["file_name"][row]),
        image=image,
        rgb=np.clip(normalization.invert(image[0]), 0, 255).astype(np.uint8),
        label=rows(batch["label"])[row, :label_height, :label_width],
        prediction=np.asarray(predictions)[row, :label_height, :label_width],
    )


def prediction_picture(item: EvaluatedImage, colours: np.ndarray) -> np.ndarray:
    """uint8 picture: the image, the prediction and the label side by side (labels drawn at the
    image's size when evaluation resized the image)."""
    panels = [item.rgb, colorize(item.prediction, colours), colorize(item.label, colours)]
    if item.prediction.shape != item.rgb.shape[:2]:
        size = (item.rgb.shape[1], item.rgb.shape[0])
        panels[1:] = [np.asarray(Image.fromarray(p).resize(size, Image.NEAREST)) for p in panels[1:]]
    return side_by_side(panels)


def attention_picture(maps: Callable, params: Any, batch_stats: Any, item: EvaluatedImage,
                      pixel: tuple[int, int] | None, prefer: tuple[int, ...] = (), copies: int = 1) -> np.ndarray:
    """uint8 picture: the image with `pixel` (label coordinates; None: one of the `prefer` classes,
    else the centre) marked, and that pixel's attention after one and two recurrences.
    `maps` is `attention.jitted_recurrence_maps` of the model; a model whose attention is sharded
    over a mesh needs a batch the mesh divides: `copies` of the image (the first one is shown)."""
    where = pixel or attention.choose_pixel(item.label, prefer)
    label_height, label_width = item.label.shape
    if not (0 <= where[0] < label_height and 0 <= where[1] < label_width):
        raise ValueError(f"--pixel {where} lies outside the {label_height}x{label_width} image")
    height, width = item.rgb.shape[:2]
    image_pixel = (where[0] * (height - 1) // max(label_height - 1, 1),
                   where[1] * (width - 1) // max(label_width - 1, 1))
    step1, step2 = maps(params, batch_stats, np.repeat(item.image, copies, axis=0), image_pixel)
    return attention.attention_panels(item.rgb, step1, step2, image_pixel)
