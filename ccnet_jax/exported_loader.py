"""Segment images with a CCNet exported by `ccnet export`, using jax, flatbuffers, numpy and Pillow alone.

(flatbuffers: `jax.export.deserialize` imports it, and jax does not install it.)

`ccnet export` copies this file next to the artefact as predict_exported.py:

    python predict_exported.py --images photo.png more/*.jpg folder/ --output-dir predictions/

Each image is turned upright by its EXIF orientation, scaled, keeping its
aspect ratio, to fit the exported input size and padded with the
normalisation's mean colour; it is segmented, its logits are resized
bilinearly (aligned corners) back to the image's upright size before the
arg-max, and NAME_trainIds.png (class ids, uint8) and NAME_colour.png are
written at that size.
Pictures already in --output-dir are not replaced unless --force is given.
In your own code:

    import jax
    exported = jax.export.deserialize(open("ccnet.jax", "rb").read())
    class_ids, logits = exported.call(images)  # uint8 (B, H, W, 3) RGB at the exported size

This file imports neither flax nor ccnet_jax.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
OUTPUT_KINDS = ("_trainIds", "_colour")


def load(folder: Path = HERE) -> tuple[jax.export.Exported, dict]:
    """The exported function and its description (input size, batch, colours, class names).

    Raises FileNotFoundError naming what is missing when `folder` is not a `ccnet export` output.
    """
    folder = Path(folder)
    missing = [name for name in ("ccnet.jax", "ccnet_export.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' or '.join(missing)}: pass the folder `ccnet export "
                                "--output` wrote with --model-dir, or run the predict_exported.py in that folder")
    exported = jax.export.deserialize((folder / "ccnet.jax").read_bytes())
    return exported, json.loads((folder / "ccnet_export.json").read_text())


def image_files(paths: list[str], output_dir: Path | None = None) -> list[Path]:
    """Files, the image files of folders (recursively) and the matches of glob patterns, in order.

    A pattern that matches nothing is kept as a path, so that it is reported as missing. Folders
    leave out the pictures this writes into `output_dir`, so that a rerun does not segment them.
    """

    def earlier_output(path: Path) -> bool:
        return (output_dir is not None and path.stem.endswith(OUTPUT_KINDS)
                and path.parent.resolve() == output_dir.resolve())

    files = []
    for text in paths:
        if Path(text).is_dir():
            files += sorted(p for p in Path(text).rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not earlier_output(p))
        else:
            files += [Path(p) for p in (sorted(glob.glob(text, recursive=True)) or [text])]
    return files


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file, upright as viewers show it (EXIF orientation)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            # 16-bit grey (I in older Pillows), which convert("RGB") would clip at 255, not scale.
            image = Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8))
        elif image.mode == "F":
            # 32-bit float grey, which convert("RGB") takes as 0-255: read as 0-1 when no pixel exceeds 1.
            grey = np.nan_to_num(np.asarray(image, np.float64))
            scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0
            image = Image.fromarray(np.clip(np.round(grey * scale), 0, 255).astype(np.uint8))
        return np.asarray(image.convert("RGB"))


def segment(exported: jax.export.Exported, info: dict, rgb: np.ndarray) -> np.ndarray:
    """uint8 (h, w) class ids of one uint8 RGB image of any size."""
    return segment_many(exported, info, [rgb])[0]


def segment_many(exported: jax.export.Exported, info: dict, images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 (h, w) class ids of each uint8 RGB image, of any sizes, `info["batch"]` per call.

    An export of a fixed batch takes that many images per call (the last call is filled up with
    copies of its first image); one of a free batch size ("batch": null) takes one image per call.
    """
    height, width = info["height"], info["width"]
    per_call = images_per_call(info)
    results = []
    for first in range(0, len(images), per_call):
        chunk = images[first : first + per_call]
        canvases, fitted = [], []
        for rgb in chunk:
            scale = min(height / rgb.shape[0], width / rgb.shape[1])
            size = (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale)))
            canvas = np.empty((height, width, 3), np.uint8)
            canvas[:] = info["pad_rgb"]
            canvas[: size[0], : size[1]] = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BILINEAR))
            canvases.append(canvas)
            fitted.append(size)
        canvases += [canvases[0]] * (per_call - len(chunk))
        _, logits = exported.call(np.stack(canvases))
        logits = np.asarray(logits, np.float32)
        for i, (rgb, size) in enumerate(zip(chunk, fitted)):
            results.append(upsampled_class_ids(logits[i, : size[0], : size[1]], rgb.shape[:2]))
    return results


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output position of one axis: the two input positions it lies between and the weight of the
    second, with aligned corners (corner pixels map to corner pixels), in float32."""
    step = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    positions = np.arange(out_size, dtype=np.float32) * step
    low = np.clip(np.floor(positions), 0, in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low.astype(np.int64), high.astype(np.int64), (positions - low).astype(np.float32)


def upsampled_class_ids(logits: np.ndarray, size: tuple[int, int], band_rows: int = 64) -> np.ndarray:
    """uint8 (H, W) = size class ids of one image's float32 logits (h, w, C), resized bilinearly with
    aligned corners before the arg-max (as `ccnet predict` and `ccnet eval` resize), `band_rows`
    output rows at a time: a large photo never holds its full-size logits."""
    if logits.shape[:2] == tuple(size):
        return np.argmax(logits, axis=-1).astype(np.uint8)
    row_low, row_high, row_frac = _taps(logits.shape[0], size[0])
    col_low, col_high, col_frac = _taps(logits.shape[1], size[1])
    ids = np.empty(size, np.uint8)
    for first in range(0, size[0], band_rows):
        rows = slice(first, first + band_rows)
        low, high = logits[row_low[rows]], logits[row_high[rows]]
        band = low + (high - low) * row_frac[rows, None, None]
        left, right = band[:, col_low], band[:, col_high]
        ids[rows] = np.argmax(left + (right - left) * col_frac[None, :, None], axis=-1)
    return ids


def images_per_call(info: dict) -> int:
    """The export's fixed batch, or 1 for an export of a free batch size ("batch": null)."""
    return info["batch"] or 1


def output_names(files: list[Path]) -> list[str]:
    """A distinct name per file: its stem, with _2, _3, ... added where taken. a.png and a.jpg
    must not overwrite each other, nor A.png and a.png where case is ignored."""
    taken, names = set(), []
    for path in files:
        name, count = path.stem, 1
        while name.casefold() in taken:
            count += 1
            name = f"{path.stem}_{count}"
        taken.add(name.casefold())
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=HERE, help="folder of ccnet.jax (default: this one)")
    parser.add_argument("--force", action="store_true", help="replace pictures of the same names in --output-dir")
    args = parser.parse_args(argv)
    try:
        exported, info = load(args.model_dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    here = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if here not in info.get("platforms", [here]):
        # Else the first image ends in jax's traceback about lowering platforms.
        parser.error(f"{args.model_dir} was exported for {', '.join(info['platforms'])} and jax here runs on {here}: "
                     "run it there, or export again with `ccnet export --platform portable` (CPU, CUDA and TPU)")
    colours = np.asarray(info["colours"], np.uint8)
    files = image_files(args.images, args.output_dir)
    if not files:
        parser.error(f"no image files in {' '.join(args.images)} ({', '.join(IMAGE_SUFFIXES)})")
    names = output_names(files)
    existing = [args.output_dir / f"{name}{kind}.png" for name in names for kind in OUTPUT_KINDS]
    existing = [path.name for path in existing if path.exists()]
    if existing and not args.force:
        parser.error(f"{len(existing)} picture(s) in {args.output_dir} would be replaced "
                     f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); choose another "
                     "--output-dir, or pass --force to replace them")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failed, pending = 0, []

    def write(pending: list[tuple[Path, str, np.ndarray]]) -> None:
        for (path, name, _), ids in zip(pending, segment_many(exported, info, [rgb for _, _, rgb in pending])):
            Image.fromarray(ids).save(args.output_dir / f"{name}_trainIds.png")
            Image.fromarray(colours[np.minimum(ids, len(colours) - 1)]).save(args.output_dir / f"{name}_colour.png")
            print(f"{path} -> {args.output_dir / name}_trainIds.png")

    for path, name in zip(files, names):
        try:
            rgb = read_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        pending.append((path, name, rgb))
        if len(pending) == images_per_call(info):
            write(pending)
            pending = []
    if pending:
        write(pending)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
