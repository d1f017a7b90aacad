"""Segmenting image files of any size: batched by size, the config's inference mode, pictures out.

For each readable image NAME it writes to the output folder:
- NAME_colour.png    the prediction in the dataset's colours;
- NAME_overlay.png   those colours blended over the image;
- NAME_labelIds.png  Cityscapes label ids (Cityscapes models), else NAME_trainIds.png with the
                     class ids, one uint8 channel;
- NAME_attention.png with an attention pixel: the image with the pixel marked, its attention
                     after one recurrence (its criss-cross) and after two.
Images are turned upright by their EXIF orientation, resized as the evaluation pipeline does
(`data.eval_resize`, if set), and, as evaluation does onto a label's size, the logits are resized
bilinearly back to that upright size before the arg-max (in bands of rows, so a large photo
never holds its full-size logits). Files of
one name in different folders get NAME, NAME_2, ..., each renaming noted. A file that cannot
be read is reported and skipped; the others are still written.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ccnet_jax.data.transforms import Normalization, fit_factor, resample_window, scaled_size
from ccnet_jax.durations import format_duration
from ccnet_jax.evaluation import attention
from ccnet_jax.evaluation.image_files import ImageFileError, base_stem, image_size, output_stems, read_rgb
from ccnet_jax.evaluation.inference import InferenceConfig, predict_logits
from ccnet_jax.evaluation.writers import colorize, overlay, write_label_ids, write_train_ids
from ccnet_jax.models.resize import argmax_resized

OUTPUT_KINDS = ("colour", "overlay", "labelIds", "trainIds", "attention")


def is_output(path: Path, output_dir: Path) -> bool:
    """Whether `path` is a picture this writes into `output_dir` (NAME_colour.png, ...)."""
    return (path.suffix == ".png" and path.stem.rsplit("_", 1)[-1] in OUTPUT_KINDS
            and path.parent.resolve() == output_dir.resolve())


@dataclasses.dataclass(frozen=True)
class FileOutputs:
    """What to write for each image."""

    colours: np.ndarray  # (num_classes, 3) uint8
    cityscapes_label_ids: bool = False
    attention_pixel: tuple[int, int] | None = None  # (y, x) in the file's pixels, upright


@dataclasses.dataclass
class PredictReport:
    images: int = 0  # images segmented
    written: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # files that could not be read
    notes: list[str] = dataclasses.field(default_factory=list)  # pictures left out for an image


def make_segmenter(model_fn: Callable[[Any, Any], Any], inference: InferenceConfig) -> Callable:
    """`segment(params, batch_stats, images) -> float32 (B, H, W, classes)` logits at the images'
    size, jitted (the config's inference mode: whole, sliding, scales, flip).

    model_fn(params, batch_stats) gives the CCNet in eval mode; images are
    normalised float32 (B, H, W, 3).
    """

    def segment(params, batch_stats, images):
        model = model_fn(params, batch_stats)
        return predict_logits(lambda x: model(x)[0], images, inference)

    return jax.jit(segment)


# Output sizes are padded up to multiples of this, so that photos of one model size but many sizes
# of their own share compilations.
_SIZE_STEP = 128
_argmax_resized = jax.jit(argmax_resized, static_argnums=1)


def class_ids(logits: jax.Array, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) class ids of one image's logits (h, w, classes), resized bilinearly with
    aligned corners onto (H, W) = size first when the sizes differ."""
    if logits.shape[:2] == size:
        return np.asarray(jnp.argmax(logits, axis=-1)).astype(np.uint8)
    padded = tuple(-(-extent // _SIZE_STEP) * _SIZE_STEP for extent in size)
    ids = _argmax_resized(logits, padded, jnp.asarray(size, jnp.int32))
    return np.asarray(ids)[: size[0], : size[1]].astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Headers:
    """What the files' headers say: the upright (height, width) of each readable image, and a line
    for each file that is not one."""

    sizes: dict[Path, tuple[int, int]]
    problems: list[str]


def read_headers(files: Sequence[Path]) -> Headers:
    """Reads each file's header (no pixels decoded): its upright size, or why it is not an image."""
    sizes, problems = {}, []
    for path in files:
        try:
            sizes[path] = image_size(path)
        except ImageFileError as err:
            problems.append(str(err))
    return Headers(sizes, problems)


def _model_size(height: int, width: int, resize: tuple[int, int] | None) -> tuple[int, int]:
    return scaled_size(height, width, fit_factor(height, width, resize)) if resize else (height, width)


def predict_files(
    files: Sequence[Path],
    output_dir: Path,
    *,
    segment: Callable,
    maps: Callable | None,
    params: Any,
    batch_stats: Any,
    normalization: Normalization,
    resize: tuple[int, int] | None,
    outputs: FileOutputs,
    batch_size: int,
    headers: Headers | None = None,
) -> PredictReport:
    """Writes the pictures of every readable file in `files`; reports what was written and skipped.

    maps(params, batch_stats, image, pixel) -> (after one recurrence, after two), (H, W) each, for
    one normalised (1, H, W, 3) image: required when outputs.attention_pixel is set. `headers`,
    `read_headers(files)` if the caller has read them already, spares a second read.
    """
    headers = headers if headers is not None else read_headers(files)
    report = PredictReport(skipped=list(headers.problems))
    output_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    for path, name in zip(files, output_stems(files)):
        if path not in headers.sizes:
            continue
        if name != base_stem(path):
            report.notes.append(f"{path}: written as {name}_*, as another image is named {base_stem(path)}")
        groups.setdefault(_model_size(*headers.sizes[path], resize), []).append((path, name))
    total = sum(len(group) for group in groups.values())
    done, start = 0, time.perf_counter()
    for size, group in groups.items():
        for first in range(0, len(group), batch_size):
            batch = []
            for path, name in group[first : first + batch_size]:
                try:
                    rgb = read_rgb(path)
                except ImageFileError as err:
                    report.skipped.append(str(err))
                    continue
                # As the evaluation pipeline (EvalTransform) resizes.
                model_rgb, _ = resample_window(rgb, None, size, (0, 0, *size))
                batch.append((name, rgb, model_rgb))
            done += len(group[first : first + batch_size])
            if batch:
                images = jnp.asarray(np.stack([normalization(model_rgb) for _, _, model_rgb in batch]))
                logits = segment(params, batch_stats, images)
                for (name, rgb, model_rgb), image_logits in zip(batch, logits):
                    prediction = class_ids(image_logits, rgb.shape[:2])
                    written, note = _write_one(output_dir, name, rgb, model_rgb, prediction, outputs,
                                               maps, params, batch_stats, normalization)
                    report.images += 1
                    report.written += written
                    if note:
                        report.notes.append(note)
            rate = done / (time.perf_counter() - start)
            eta = (total - done) / rate if rate > 0 else 0.0
            print(f"predict {done}/{total} images  {rate:.2f} images/s  ETA {format_duration(eta)}",
                  file=sys.stderr, flush=True)
    return report


def picture_paths(output_dir: Path, name: str, outputs: FileOutputs, size: tuple[int, int]) -> dict[str, Path]:
    """The pictures written for the image NAME of upright (height, width) `size`, by kind."""
    kinds = ["colour", "overlay", "labelIds" if outputs.cityscapes_label_ids else "trainIds"]
    if outputs.attention_pixel is not None and _inside(outputs.attention_pixel, size):
        kinds.append("attention")
    return {kind: output_dir / f"{name}_{kind}.png" for kind in kinds}


def existing_pictures(files: Sequence[Path], output_dir: Path, outputs: FileOutputs, headers: Headers) -> list[Path]:
    """The pictures `predict_files` would write for `files` that are in `output_dir` already."""
    return [picture for path, name in zip(files, output_stems(files)) if path in headers.sizes
            for picture in picture_paths(output_dir, name, outputs, headers.sizes[path]).values() if picture.exists()]


def _inside(pixel: tuple[int, int], size: tuple[int, int]) -> bool:
    return 0 <= pixel[0] < size[0] and 0 <= pixel[1] < size[1]


def _write_one(output_dir, name, rgb, model_rgb, prediction, outputs, maps, params, batch_stats,
               normalization) -> tuple[list[Path], str | None]:
    """The files written for one image, and a note when its attention picture could not be drawn."""
    paths = picture_paths(output_dir, name, outputs, rgb.shape[:2])
    colour = colorize(prediction, outputs.colours)
    Image.fromarray(colour).save(paths["colour"])
    Image.fromarray(overlay(rgb, colour)).save(paths["overlay"])
    if outputs.cityscapes_label_ids:
        write_label_ids(paths["labelIds"], prediction)
    else:
        write_train_ids(paths["trainIds"], prediction)
    if outputs.attention_pixel is None:
        return list(paths.values()), None
    y, x = outputs.attention_pixel
    height, width = rgb.shape[:2]
    if "attention" not in paths:
        note = f"{name}: --attention {y},{x} is outside its {height}x{width} pixels, no attention picture"
        return list(paths.values()), note
    scale_y, scale_x = model_rgb.shape[0] / height, model_rgb.shape[1] / width
    pixel = (min(int(y * scale_y), model_rgb.shape[0] - 1), min(int(x * scale_x), model_rgb.shape[1] - 1))
    image = jnp.asarray(normalization(model_rgb))[None]
    step1, step2 = maps(params, batch_stats, image, pixel)
    Image.fromarray(attention.attention_panels(model_rgb, step1, step2, pixel)).save(paths["attention"])
    return list(paths.values()), None
