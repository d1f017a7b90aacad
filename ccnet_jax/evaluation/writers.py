"""Prediction pictures: colour PNGs, Cityscapes labelId PNGs (test-server format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ccnet_jax.data import ade20k, cityscapes, long_range


def palette(dataset: str) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours of a dataset's train ids."""
    palettes = {"cityscapes": cityscapes.PALETTE, "ade20k": ade20k.palette(), "long_range": long_range.PALETTE}
    if dataset not in palettes:
        raise ValueError(f"no palette for dataset {dataset!r}; known: {', '.join(palettes)}")
    return palettes[dataset]


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB picture of integer (H, W) class ids; 255 and unknown ids are black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(colors)] = colors
    return table[np.clip(labels, 0, 255).astype(np.uint8)]


def stem(file_name: str) -> str:
    """An output file stem from an example's file name (folders dropped, extension removed)."""
    name = Path(str(file_name)).name
    for suffix in ("_leftImg8bit.png", ".png", ".jpg", ".jpeg"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or "image"


def write_colour(path: Path, prediction: np.ndarray, colors: np.ndarray) -> None:
    """Writes the (H, W) prediction as an RGB PNG."""
    Image.fromarray(colorize(prediction, colors)).save(path)


def write_label_ids(path: Path, prediction: np.ndarray) -> None:
    """Writes (H, W) Cityscapes train ids as a labelIds PNG (uint8, one channel)."""
    Image.fromarray(cityscapes.train_ids_to_label_ids(prediction.astype(np.uint8))).save(path)


def side_by_side(pictures: list[np.ndarray], gap: int = 4, min_height: int = 256) -> np.ndarray:
    """uint8 RGB pictures of one height joined left to right with white gaps.

    Pictures lower than `min_height` (such as the 97x129 demo images) are first
    enlarged by a whole factor, pixels as blocks, so that they can be looked at.
    """
    height = max(p.shape[0] for p in pictures)
    factor = max(1, -(-min_height // height))
    if factor > 1:
        pictures = [np.repeat(np.repeat(p, factor, axis=0), factor, axis=1) for p in pictures]
        height *= factor
    parts = []
    for picture in pictures:
        padded = np.full((height, picture.shape[1], 3), 255, np.uint8)
        padded[: picture.shape[0]] = picture
        parts += [padded, np.full((height, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)
