"""Segment images with a CCNet exported by `ccnet export`, using jax, numpy and Pillow alone.

`ccnet export` copies this file next to the artefact as predict_exported.py:

    python predict_exported.py --images photo.png more/*.jpg --output-dir predictions/

Each image is resized to the exported input size, segmented, and NAME_ids.png
(class ids, uint8) and NAME_colour.png are written at the image's own size.
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
from pathlib import Path

import jax
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def load(folder: Path = HERE) -> tuple[jax.export.Exported, dict]:
    """The exported function and its description (input size, batch, colours, class names)."""
    exported = jax.export.deserialize((folder / "ccnet.jax").read_bytes())
    return exported, json.loads((folder / "ccnet_export.json").read_text())


def segment(exported: jax.export.Exported, info: dict, rgb: np.ndarray) -> np.ndarray:
    """uint8 (h, w) class ids of one uint8 RGB image of any size."""
    height, width = info["height"], info["width"]
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    batch = info["batch"] or 1
    images = np.repeat(resized[None], batch, axis=0)
    class_ids, _ = exported.call(images)
    ids = np.asarray(class_ids[0], np.uint8)
    return np.asarray(Image.fromarray(ids).resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", required=True, help="image files or glob patterns")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=HERE, help="folder of ccnet.jax (default: this one)")
    args = parser.parse_args(argv)
    exported, info = load(args.model_dir)
    colours = np.asarray(info["colours"], np.uint8)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(p) for pattern in args.images for p in (sorted(glob.glob(pattern)) or [pattern])]
    failed = 0
    for path in files:
        try:
            rgb = np.asarray(Image.open(path).convert("RGB"))
        except OSError as err:
            print(f"skipped {path}: {err}")
            failed += 1
            continue
        ids = segment(exported, info, rgb)
        Image.fromarray(ids).save(args.output_dir / f"{path.stem}_ids.png")
        Image.fromarray(colours[np.minimum(ids, len(colours) - 1)]).save(args.output_dir / f"{path.stem}_colour.png")
        print(f"{path} -> {args.output_dir / path.stem}_ids.png")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
