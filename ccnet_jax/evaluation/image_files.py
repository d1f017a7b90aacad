"""Images on disk for `ccnet predict --images`: finding them, reading them, naming their outputs."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# What Pillow raises for a file it cannot or will not decode (a decompression bomb is no OSError).
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class ImageFileError(ValueError):
    """A file that cannot be read as an image."""


def collect_images(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """(image files, problems) from files, folders (their image files, recursively) and globs.

    A folder contributes the files with an image suffix; a file given by name
    is taken whatever its suffix (it is reported later if it is no image). A
    path or pattern that matches nothing becomes a problem line. Each file
    appears once, in the order given (folders and globs sorted).
    """
    found: list[Path] = []
    problems: list[str] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                problems.append(f"{text}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                problems.append(f"{text}: no file matches this pattern")
        else:
            matches = []
            problems.append(f"{text}: no such file or folder")
        found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, problems


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UNREADABLE as err:
        raise ImageFileError(f"{path}: not a readable image ({err})") from None
    return height, width


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image file (grey and RGBA are converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except UNREADABLE as err:
        raise ImageFileError(f"{path}: not a readable image ({err})") from None


def output_stems(files: Sequence[Path]) -> list[str]:
    """A distinct output name stem per file: its own stem, with _2, _3, ... added where taken."""
    taken: set[str] = set()
    stems = []
    for path in files:
        base = path.stem.removesuffix("_leftImg8bit") or "image"
        name, count = base, 1
        while name in taken:
            count += 1
            name = f"{base}_{count}"
        taken.add(name)
        stems.append(name)
    return stems
