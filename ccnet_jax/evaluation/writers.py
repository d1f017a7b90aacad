"""Prediction pictures: colour PNGs, and the benchmarks' formats (Cityscapes labelIds, ADE20K class numbers)."""

from __future__ import annotations

import colorsys
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


def palette_for(dataset: str, num_classes: int) -> np.ndarray:
    """The dataset's palette when it has colours for `num_classes`, else distinct generated colours."""
    try:
        colours = palette(dataset)
    except ValueError:
        colours = np.zeros((0, 3), np.uint8)
    if len(colours) >= num_classes:
        return colours
    # Well-spread hues (golden-ratio steps), deterministic for a class count.
    hues = [(i * 0.618033988749895) % 1.0 for i in range(num_classes)]
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], np.uint8).reshape(
        num_classes, 3
    )


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


def write_ade20k_ids(path: Path, prediction: np.ndarray) -> None:
    """Writes (H, W) ADE20K train ids 0..149 in the benchmark's numbering 1..150 (uint8, one channel).

    The ADE20K devkit scores 0 as "other" (unlabeled), so the 0-based train ids are shifted up by one.
    """
    if prediction.size and int(prediction.max()) >= ade20k.NUM_CLASSES:
        # Predictions are an argmax over the 150 classes; anything else (the ignore label 255, a label
        # map passed by mistake, a model of more classes) has no ADE20K class number to write.
        raise ValueError(f"ADE20K prediction holds class id {int(prediction.max())} for {path.name}; train ids "
                         f"are 0..{ade20k.NUM_CLASSES - 1}: write a model's argmax over the "
                         f"{ade20k.NUM_CLASSES} ADE20K classes")
    Image.fromarray(prediction.astype(np.uint8) + np.uint8(1)).save(path)


def write_train_ids(path: Path, prediction: np.ndarray) -> None:
    """Writes (H, W) class ids (train ids, < 256) as a one-channel uint8 PNG."""
    Image.fromarray(prediction.astype(np.uint8)).save(path)


COLOUR_FOLDER = "colour"
SUBMISSION_FOLDER = "submission"
# Per dataset: the submission file name's ending and its writer. The official evaluation scripts walk
# the prediction folder recursively and match each image's prefix, so this folder holds exactly one
# file per image; the colour pictures live beside it, in their own folder.
_SUBMISSION_FORMATS = {"cityscapes": ("_labelIds.png", write_label_ids), "ade20k": (".png", write_ade20k_ids)}


def eval_output_folders(output_dir: Path, dataset: str) -> tuple[Path, Path | None]:
    """(colour folder, submission folder or None) of `ccnet eval --output-dir`: DIR/colour holds
    NAME.png for every dataset; DIR/submission the benchmark's format, for Cityscapes and ADE20K."""
    output_dir = Path(output_dir)
    submission = output_dir / SUBMISSION_FOLDER if dataset in _SUBMISSION_FORMATS else None
    return output_dir / COLOUR_FOLDER, submission


class EvalOutputs:
    """Writes `ccnet eval --output-dir DIR`'s files: DIR/colour/NAME.png and, for a benchmark
    dataset, DIR/submission/NAME_labelIds.png (Cityscapes) or NAME.png (ADE20K, classes 1..150)."""

    def __init__(self, output_dir: Path, dataset: str, colours: np.ndarray):
        self.colour_dir, self.submission_dir = eval_output_folders(output_dir, dataset)
        self._format = _SUBMISSION_FORMATS.get(dataset)
        self._colours = colours

    def make_folders(self) -> None:
        """Creates the folders (kept if there: --force writes into an earlier output)."""
        for folder in (self.colour_dir, self.submission_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)

    def write(self, file_name: str, prediction: np.ndarray) -> None:
        """Writes one example's (H, W) train-id prediction, named after its `file_name`."""
        name = stem(file_name)
        write_colour(self.colour_dir / f"{name}.png", prediction, self._colours)
        if self._format is not None:
            ending, writer = self._format
            writer(self.submission_dir / f"{name}{ending}", prediction)


def overlay(rgb: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB: the image with the colour prediction blended over it (`alpha` of the colours)."""
    return (rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def side_by_side(pictures: list[np.ndarray], gap: int = 4, min_height: int = 256,
                 max_width: int = 4096) -> np.ndarray:
    """uint8 RGB pictures of one height joined left to right with white gaps.

    Pictures lower than `min_height` (such as the 97x129 demo images) are first
    enlarged by a whole factor, pixels as blocks, so that they can be looked at;
    the factor stops where the joined picture would pass `max_width` pixels.
    """
    height = max(p.shape[0] for p in pictures)
    gaps = gap * (len(pictures) - 1)
    # Without the bound a long thin image (a 2x4000 strip) would be enlarged 128 times, into a picture
    # of gigabytes; it is enlarged only as far as it stays viewable.
    widest = max(1, (max_width - gaps) // sum(p.shape[1] for p in pictures))
    factor = max(1, min(-(-min_height // height), widest))
    if factor > 1:
        pictures = [np.repeat(np.repeat(p, factor, axis=0), factor, axis=1) for p in pictures]
        height *= factor
    parts = []
    for picture in pictures:
        padded = np.full((height, picture.shape[1], 3), 255, np.uint8)
        padded[: picture.shape[0]] = picture
        parts += [padded, np.full((height, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)
