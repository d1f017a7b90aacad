"""Images on disk for `ccnet predict --images`: finding them, reading them, naming their outputs."""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# What Pillow raises for a file it cannot or will not decode (a decompression bomb is no OSError).
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
# 16-bit greyscale (older Pillows open it as I). convert("RGB") clips such pixels at 255 rather
# than scaling them, which turns a 16-bit picture nearly white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageFileError(ValueError):
    """A file that cannot be read as an image."""


def collect_images(paths: Sequence[str], exclude: Callable[[Path], bool] | None = None
                   ) -> tuple[list[Path], list[str]]:
    """(image files, problems) from files, folders (their image files, recursively) and globs.

    A folder contributes the files with an image suffix; a file given by name
    is taken whatever its suffix (it is reported later if it is no image). A
    path or pattern that matches nothing becomes a problem line. Each file
    appears once, in the order given (folders and globs sorted). Folders and
    globs leave out the files for which `exclude` is true (a previous run's
    pictures, when the output folder lies among the inputs).
    """
    found: list[Path] = []
    problems: list[str] = []

    def kept(path: Path) -> bool:
        return path.is_file() and not (exclude is not None and exclude(path))

    for text in paths:
        path = Path(text)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and kept(p))
            if not matches:
                problems.append(f"{text}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if kept(Path(p)))
            if not matches:
                problems.append(f"{text}: no file matches this pattern")
        else:
            matches = []
            problems.append(f"{text}: no such file or folder")
        found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, problems


def _orientation(image: Image.Image) -> int:
    # Image.getexif of a PNG decodes all its pixels in case EXIF follows them; the EXIF ahead of
    # the pixels (where the PNG spec puts it, and all other formats) is read without decoding.
    return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) upright (EXIF orientation applied), from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if hasattr(image, "tag_v2"):
                # The TIFF's stored size: newer Pillows report it already turned, older ones not.
                width, height = image.tag_v2.get(256, width), image.tag_v2.get(257, height)
            if _orientation(image) in (5, 6, 7, 8):
                width, height = height, width
    except UNREADABLE as err:
        raise ImageFileError(f"{path}: not a readable image ({err})") from None
    return height, width


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image file, upright as viewers show it (EXIF orientation).

    Grey, palette, RGBA and CMYK are converted; 16-bit grey is scaled to 8 bits;
    32-bit float grey is read as 0-1 when no pixel exceeds 1, else as 0-255.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in SIXTEEN_BIT_MODES:
                grey = np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8)
                image = Image.fromarray(grey)
            elif image.mode == "F":
                # convert("RGB") takes float pixels as 0-255, so a 0-1 picture came out nearly black.
                grey = np.nan_to_num(np.asarray(image, np.float64))
                scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0
                image = Image.fromarray(np.clip(np.round(grey * scale), 0, 255).astype(np.uint8))
            return np.asarray(image.convert("RGB"))
    except UNREADABLE as err:
        raise ImageFileError(f"{path}: not a readable image ({err})") from None


def base_stem(path: Path) -> str:
    """The output name stem a file asks for (a Cityscapes image's without `_leftImg8bit`)."""
    return path.stem.removesuffix("_leftImg8bit") or "image"


def output_stems(files: Sequence[Path]) -> list[str]:
    """A distinct output name stem per file: its own stem, with _2, _3, ... added where taken.

    Names differing only in case count as taken too: on a case-insensitive file system
    (macOS, Windows) they would be one file.
    """
    taken: set[str] = set()
    stems = []
    for path in files:
        base = base_stem(path)
        name, count = base, 1
        while name.casefold() in taken:
            count += 1
            name = f"{base}_{count}"
        taken.add(name.casefold())
        stems.append(name)
    return stems
