"""Pieces shared by the dataset builders: errors, archive/folder reading, image checks.

Builders store images as encoded bytes (PNG or the original JPEG) and labels as
single-channel PNGs of train ids, so that preparing and reading need no
TensorFlow (tfds only needs TensorFlow to *encode* numpy arrays).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "validation", "test")


class DataError(RuntimeError):
    """Base class of the data errors; each message says what to do about it."""


class MissingDownloadError(DataError):
    """A manually downloaded archive (or its extracted folder) is absent."""


class CorruptImageError(DataError):
    """An image or label file cannot be decoded, or image and label disagree."""


class DatasetNotPreparedError(DataError):
    """The prepared dataset is absent or only partly written."""


@dataclasses.dataclass(frozen=True)
class ManualFile:
    """One manual download: archive name, where it comes from, the folder it unpacks to."""

    archive: str
    url: str
    extracted: str
    note: str = ""


def missing_download_message(dataset: str, missing: Sequence[ManualFile], manual_dir: Path) -> str:
    """The error text naming each file to fetch, where from, and the folder to put it in."""
    lines = [f"{dataset}: {len(missing)} manual download(s) missing from {manual_dir}:"]
    for item in missing:
        note = f" ({item.note})" if item.note else ""
        lines.append(
            f"  - {item.archive}{note}\n"
            f"      fetch it from {item.url}\n"
            f"      and put it (or the folder '{item.extracted}/' it unpacks to) in {manual_dir}"
        )
    if not manual_dir.exists():
        lines.append(f"{manual_dir} does not exist: create it and put the downloads there, or pass the folder "
                     "that holds them with --manual-dir.")
    elif manual_dir.is_file():
        lines.append(
            f"{manual_dir} is a file: the manual directory must be the folder that holds the "
            f"downloads, here {manual_dir.parent}."
        )
    elif manual_dir.name in {item.extracted for item in missing}:
        lines.append(
            f"{manual_dir} is the extracted folder '{manual_dir.name}/' itself: pass the folder that holds "
            f"it, --manual-dir {manual_dir.parent}."
        )
    lines.append("Then run the preparation again; nothing needs to be extracted by hand.")
    return "\n".join(lines)


class FileTree:
    """Read-only view of files either inside a zip archive or under a folder.

    Paths are POSIX, relative to the archive root (or the folder), e.g.
    `leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png`.
    """

    def __init__(self, location: Path, top: str | None = None):
        self.location = Path(location)
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if self.location.is_file():
            try:
                self._zip = zipfile.ZipFile(self.location)
            except zipfile.BadZipFile as err:
                raise CorruptImageError(
                    f"{self.location} is not a readable zip archive ({err}); download it again."
                ) from err
            if top is not None:
                self._prefix = _zip_prefix(self._zip.namelist(), top)

    def __enter__(self) -> FileTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def files(self, prefix: str) -> list[str]:
        """Sorted relative paths of all files under `prefix` (a folder path, no trailing '/')."""
        prefix = prefix.rstrip("/") + "/"
        if self._zip is not None:
            prefix = self._prefix + prefix
            return sorted(
                n.removeprefix(self._prefix)
                for n in self._zip.namelist()
                if n.startswith(prefix) and not n.endswith("/")
            )
        root = self.location / prefix
        if not root.is_dir():
            return []
        return sorted(
            p.relative_to(self.location).as_posix() for p in root.rglob("*") if p.is_file()
        )

    def read(self, relative: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(self._prefix + relative)
            # A damaged member fails its CRC or decompression; zips that Windows writes for
            # large folders use Deflate64, which zipfile cannot decompress (NotImplementedError).
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
                raise CorruptImageError(
                    f"{self.describe(relative)} cannot be read from the archive ({err}). Download the "
                    "archive again, or put its extracted folder in place of the zip."
                ) from err
        return (self.location / relative).read_bytes()

    def describe(self, relative: str) -> str:
        """Human-readable location of a file, for error messages."""
        if self._zip is not None:
            return f"{self._prefix}{relative} in {self.location}"
        return str(self.location / relative)


def _zip_prefix(names: Sequence[str], top: str) -> str:
    """The folder "X/" holding `top/` in an archive re-made from an extracted folder X, so that
    it reads like the original; "" when `top/` is at the root (or no single such folder exists)."""
    if any(name.startswith(f"{top}/") for name in names):
        return ""
    parents = {
        name.split("/", 1)[0] + "/"
        for name in names
        if name.count("/") >= 2 and name.split("/", 2)[1] == top and not name.startswith("__MACOSX/")
    }
    return parents.pop() if len(parents) == 1 else ""


def find_tree(manual_dir: Path, item: ManualFile) -> Path | None:
    """The zip archive if present, else the folder holding the extracted tree, else None.

    The extracted layout is accepted both directly in `manual_dir` and inside a
    folder named after the archive (as some unzip tools create it).
    """
    archive = manual_dir / item.archive
    if archive.is_file():
        return archive
    for root in (manual_dir, manual_dir / Path(item.archive).stem):
        if (root / item.extracted).is_dir():
            return root
    return None


def decode_image(data: bytes, where: str) -> Image.Image:
    """Fully decodes `data` with PIL, so truncated or damaged files fail here, naming `where`."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many unrelated types for bad data
        raise CorruptImageError(
            f"{where} is corrupt or not an image ({type(err).__name__}: {err}). "
            "Replace this file (or re-download its archive) and prepare again."
        ) from err
    return image


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    buffer = io.BytesIO()
    # compress_level 1: labels compress well anyway and preparation stays fast.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def rgb_image_bytes(data: bytes, where: str) -> tuple[bytes, tuple[int, int]]:
    """Checks an image file and returns bytes that decode to 8-bit RGB, and its (H, W).

    The original bytes are kept when they already decode to RGB; other modes
    (grayscale, palette, CMYK, RGBA) are converted and stored as PNG, because the
    reader (tfds with PIL) returns the array in the file's own mode.
    """
    image = decode_image(data, where)
    size = (image.height, image.width)
    if image.mode == "RGB":
        return data, size
    return encode_png(np.asarray(image.convert("RGB"))), size


def label_array(data: bytes, where: str) -> np.ndarray:
    """Decodes a single-channel 8-bit label PNG to a uint8 (H, W) array."""
    image = decode_image(data, where)
    if image.mode not in ("L", "P"):
        raise CorruptImageError(
            f"{where} has mode {image.mode!r}, expected an 8-bit single-channel label image. "
            "Use the original annotation file."
        )
    return np.asarray(image, dtype=np.uint8)


def check_same_size(image_size: tuple[int, int], label: np.ndarray, image_where: str, label_where: str) -> None:
    if tuple(label.shape) != tuple(image_size):
        raise CorruptImageError(
            f"{label_where} is {label.shape[0]}x{label.shape[1]} but its image {image_where} is "
            f"{image_size[0]}x{image_size[1]}; the pair does not belong together. Replace the files."
        )


def incomplete_leftovers(data_path: Path) -> list[Path]:
    """Temporary folders that tfds left behind when a preparation of `data_path` was killed."""
    parent = data_path.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.glob(f"incomplete.*_{data_path.name}") if p.is_dir())


def iter_pairs(paths: Sequence[str], suffix: str) -> Iterator[tuple[str, str]]:
    """(path, stem without `suffix`) for each path ending in `suffix`, in any letter case.

    macOS "._" files (AppleDouble metadata, left next to every file copied from a Mac to
    exFAT or network drives) carry the same suffix but are not images, so they are skipped.
    """
    for path in paths:
        name = os.path.basename(path)
        if name.lower().endswith(suffix.lower()) and not name.startswith("._"):
            yield path, name[: -len(suffix)]


def check_labels_have_images(dataset: str, labels: FileTree, label_paths: Iterable[str], label_suffix: str,
                             image_pairs: Iterable[tuple[str, str]], images_where: str, item: ManualFile) -> None:
    """Refuses label files (of `label_suffix`) whose image is absent, matched by stem in any letter
    case as images and labels are paired: a partly extracted or copied image download, which would
    otherwise be prepared as a smaller split without a word. `image_pairs` are (path, stem)."""
    have = {stem.lower() for _, stem in image_pairs}
    orphans = [labels.describe(path) for path, stem in iter_pairs(sorted(label_paths), label_suffix)
               if stem.lower() not in have]
    if orphans:
        shown = ", ".join(orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3 else "")
        raise MissingDownloadError(
            f"{dataset}: {len(orphans)} label(s) have no image under {images_where}: {shown}; {item.archive} "
            f"from {item.url} is incomplete (an interrupted unzip or copy). Download it again.")


def warn_unofficial_count(dataset: str, split: str, found: int, official: int) -> None:
    """One stderr line when a prepared split's size differs from the official archive's. Not an error:
    a subset (or the tests' small fake archives) is legitimate, but a partial download is the usual cause."""
    if found != official:
        # tfds' progress bars (tqdm, which tfds depends on) are still drawn here: tqdm.write puts the line
        # above them instead of after a bar's text.
        from tqdm.auto import tqdm

        tqdm.write(f"warning: {dataset} split {split!r} has {found} examples, the official archive {official}; a "
                   "partly extracted or partly copied download is the usual cause (a deliberate subset is fine)",
                   file=sys.stderr)
