"""Small stand-ins for the manual downloads, in the official layout and file names.

Used by the tests and the input benchmark: `write_cityscapes` and
`write_ade20k` produce the zips (or the extracted folders) that the builders
read, with random images and labels that the caller gets back to compare.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) image with smooth regions, edges and noise; a 1024x2048 PNG of it is
    about 2.3 MB, like a Cityscapes leftImg8bit file."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    tint = rng.uniform(0.0, 255.0, size=(2, 1, 1, 3)).astype(np.float32)
    image = tint[0] * rows + tint[1] * cols
    for _ in range(12):
        r0, c0 = rng.integers(0, height), rng.integers(0, width)
        image[r0 : r0 + height // 4, c0 : c0 + width // 6] = rng.uniform(0, 255, size=3)
    image += rng.normal(0.0, 2.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


class _Writer:
    """Writes files either into a zip or under a folder, by relative path."""

    def __init__(self, target: Path, as_zip: bool):
        self.target = target
        self._zip = zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) if as_zip else None

    def write(self, relative: str, data: bytes) -> None:
        if self._zip is not None:
            self._zip.writestr(relative, data)
        else:
            path = self.target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def write_cityscapes(
    manual_dir: Path,
    counts: Mapping[str, int] | None = None,
    size: tuple[int, int] = (16, 32),
    as_zip: bool = True,
    seed: int = 0,
    photo: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """Writes leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (or their folders).

    `counts` maps the official folders to image counts (default train 2, val 1, test 1).
    Labels hold random labelIds in 0..33 (per pixel, or in 64x64 blocks if
    `photo`) plus a few invalid values; images are random noise, or
    `synthetic_photo` content if `photo`. Extra files of the
    real archives (README, license, colour/instance/polygon annotations) are
    written too, since the builder must skip them.

    Returns:
      {path of the image inside leftImg8bit/: {"image": (H, W, 3), "label_ids": (H, W)}}.
    """
    counts = counts if counts is not None else {"train": 2, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    images = _Writer(manual_dir / ("leftImg8bit_trainvaltest.zip" if as_zip else ""), as_zip)
    labels = _Writer(manual_dir / ("gtFine_trainvaltest.zip" if as_zip else ""), as_zip)
    images.write("license.txt", b"fake")
    labels.write("README", b"fake")
    written: dict[str, dict[str, np.ndarray]] = {}
    height, width = size
    for folder, count in counts.items():
        for i in range(count):
            city = CITIES[folder][i % len(CITIES[folder])]
            stem = f"{city}_{i:06d}_{19 + i:06d}"
            image = synthetic_photo(rng, height, width) if photo else rng.integers(
                0, 256, size=(height, width, 3), dtype=np.uint8
            )
            if photo:  # regions, so the label PNG is as small and quick to decode as a real one
                coarse = rng.integers(0, 34, size=(-(-height // 64), -(-width // 64)), dtype=np.uint8)
                label_ids = np.ascontiguousarray(coarse.repeat(64, axis=0).repeat(64, axis=1)[:height, :width])
            else:
                label_ids = rng.integers(0, 34, size=(height, width), dtype=np.uint8)
            label_ids.flat[:3] = (34, 200, 255)  # values outside the table must become 255
            relative = f"{folder}/{city}/{stem}_leftImg8bit.png"
            images.write(f"leftImg8bit/{relative}", _encode(image))
            base = f"gtFine/{folder}/{city}/{stem}_gtFine"
            labels.write(f"{base}_labelIds.png", _encode(label_ids))
            labels.write(f"{base}_instanceIds.png", _encode(label_ids))
            labels.write(f"{base}_color.png", _encode(image))
            labels.write(f"{base}_polygons.json", b"{}")
            written[relative] = {"image": image, "label_ids": label_ids}
    images.close()
    labels.close()
    return written


def write_ade20k(
    manual_dir: Path,
    counts: Mapping[str, int] | None = None,
    size: tuple[int, int] = (20, 24),
    as_zip: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Writes ADEChallengeData2016.zip (or its folder) with JPEG images and PNG annotations.

    `counts` maps the official folders to image counts (default training 2, validation 1).
    The first training image is a grayscale JPEG, as a few real ones are.

    Returns:
      {path of the image inside images/: {"image": decoded (H, W, 3) RGB, "raw": (H, W)}}.
    """
    counts = counts if counts is not None else {"training": 2, "validation": 1}
    rng = np.random.default_rng(seed)
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(manual_dir / ("ADEChallengeData2016.zip" if as_zip else ""), as_zip)
    root = "ADEChallengeData2016"
    writer.write(f"{root}/objectInfo150.txt", b"fake")
    writer.write(f"{root}/sceneCategories.txt", b"fake")
    written: dict[str, dict[str, np.ndarray]] = {}
    height, width = size
    for folder, count in counts.items():
        tag = "train" if folder == "training" else "val"
        for i in range(count):
            stem = f"ADE_{tag}_{i + 1:08d}"
            gray = folder == "training" and i == 0
            shape = (height, width) if gray else (height, width, 3)
            jpeg = _encode(rng.integers(0, 256, size=shape, dtype=np.uint8), "JPEG")
            decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            raw = rng.integers(0, 151, size=(height, width), dtype=np.uint8)
            raw.flat[:2] = (151, 255)  # out-of-range values must become 255
            writer.write(f"{root}/images/{folder}/{stem}.jpg", jpeg)
            writer.write(f"{root}/annotations/{folder}/{stem}.png", _encode(raw))
            written[f"{folder}/{stem}.jpg"] = {"image": decoded, "raw": raw}
    writer.close()
    return written
