"""Cityscapes (fine annotations): the official label table and the TFDS builder.

The builder reads the two manual downloads, `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip`, either as the zips or as their extracted folders, and
stores each image with its label already mapped to the 19 train ids (255 =
ignore), together with the image's path inside `leftImg8bit/` so that test
predictions can be written back under the official names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from ccnet_jax.data import common
from ccnet_jax.labels import IGNORE_LABEL


class CityscapesLabel(NamedTuple):
    name: str
    label_id: int
    train_id: int
    color: tuple[int, int, int]


# The official table (cityscapesScripts `labels.py`); train id 255 = ignored in
# training and evaluation. `license plate` (id -1) never occurs in labelIds PNGs.
LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
)

NUM_CLASSES = 19
_TRAIN_LABELS = sorted((label for label in LABELS if label.train_id != 255), key=lambda label: label.train_id)
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _TRAIN_LABELS)
PALETTE: np.ndarray = np.array(
    [label.color for label in _TRAIN_LABELS],
    dtype=np.uint8,
)  # (19, 3) RGB colour of each train id

LABEL_ID_TO_TRAIN_ID: np.ndarray = np.full(256, 255, dtype=np.uint8)
for _label in LABELS:
    LABEL_ID_TO_TRAIN_ID[_label.label_id] = _label.train_id

TRAIN_ID_TO_LABEL_ID: np.ndarray = np.zeros(256, dtype=np.uint8)  # 255 (ignore) -> 0 unlabeled
for _label in LABELS:
    if _label.train_id != 255:
        TRAIN_ID_TO_LABEL_ID[_label.train_id] = _label.label_id


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps a uint8 (H, W) labelIds map to train ids (every non-evaluated id -> 255)."""
    return LABEL_ID_TO_TRAIN_ID[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Maps uint8 train-id predictions (H, W) to labelIds, the format of the test server."""
    return TRAIN_ID_TO_LABEL_ID[train_ids]


DOWNLOADS_URL = "https://www.cityscapes-dataset.com/downloads/"
IMAGES = common.ManualFile(
    archive="leftImg8bit_trainvaltest.zip",
    url=DOWNLOADS_URL,
    extracted="leftImg8bit",
    note="11 GB, needs a free account",
)
LABELS_ARCHIVE = common.ManualFile(
    archive="gtFine_trainvaltest.zip",
    url=DOWNLOADS_URL,
    extracted="gtFine",
    note="241 MB, needs a free account",
)
MANUAL_FILES = (IMAGES, LABELS_ARCHIVE)

_SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}
# Images per split in the official leftImg8bit_trainvaltest.zip.
OFFICIAL_COUNTS = {"train": 2975, "validation": 500, "test": 1525}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def locate_manual_files(manual_dir: Path) -> tuple[Path, Path]:
    """(images location, labels location): each a zip or a folder; raises naming what is missing."""
    found = {item.archive: common.find_tree(Path(manual_dir), item) for item in MANUAL_FILES}
    missing = [item for item in MANUAL_FILES if found[item.archive] is None]
    if missing:
        raise common.MissingDownloadError(
            common.missing_download_message("cityscapes", missing, Path(manual_dir))
        )
    return found[IMAGES.archive], found[LABELS_ARCHIVE.archive]


class CcnetCityscapes(tfds.core.GeneratorBasedBuilder):
    """Cityscapes fine annotations with labels as the 19 train ids (255 = ignore)."""

    name = "ccnet_cityscapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fine annotations, labels stored as train ids."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Register at {DOWNLOADS_URL} and download {IMAGES.archive} and "
        f"{LABELS_ARCHIVE.archive} into the manual folder (zips or extracted folders)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Cityscapes fine annotations; label = train id (19 classes), 255 = ignore.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage="https://www.cityscapes-dataset.com/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        images, labels = locate_manual_files(dl_manager.manual_dir)
        return {split: self._generate_examples(images, labels, split) for split in _SPLIT_DIRS}

    def _generate_examples(self, images_at: Path, labels_at: Path, split: str) -> Iterator[tuple[str, dict]]:
        folder = _SPLIT_DIRS[split]
        with (common.FileTree(images_at, IMAGES.extracted) as images,
              common.FileTree(labels_at, LABELS_ARCHIVE.extracted) as labels):
            pairs = _image_pairs(images, folder)
            # Keyed by lower case, as the images are matched: a label may differ in its extension's case.
            label_paths = {p.lower(): p for p in labels.files(f"{LABELS_ARCHIVE.extracted}/{folder}")}
            # Only labelIds count: the archive's _color, _instanceIds and _polygons.json files are not
            # read. Test labels are dummies, but a test folder that has them has one for every image.
            common.check_labels_have_images("cityscapes", labels, label_paths.values(), _LABEL_SUFFIX, pairs,
                                            images.describe(f"{IMAGES.extracted}/{folder}/"), IMAGES)
            for image_path, stem in pairs:
                yield stem, _example(images, labels, label_paths, image_path, stem, folder)
        common.warn_unofficial_count("cityscapes", split, len(pairs), OFFICIAL_COUNTS[split])


def _image_pairs(images: common.FileTree, folder: str) -> list[tuple[str, str]]:
    """(image path, stem) of a split's images; refuses a split without any."""
    pairs = list(common.iter_pairs(images.files(f"{IMAGES.extracted}/{folder}"), _IMAGE_SUFFIX))
    if not pairs:
        raise common.MissingDownloadError(
            f"cityscapes: no *{_IMAGE_SUFFIX} images under "
            f"{images.describe(f'{IMAGES.extracted}/{folder}/')}; the archive {IMAGES.archive} "
            f"from {DOWNLOADS_URL} is incomplete. Download it again."
        )
    return pairs



def _example(images: common.FileTree, labels: common.FileTree, label_paths: dict[str, str], image_path: str,
             stem: str, folder: str) -> dict:
    """One stored example: the image, its labelIds as train ids (all ignore for an unlabelled test image)."""
    city = stem.split("_", 1)[0]
    label_path = f"{LABELS_ARCHIVE.extracted}/{folder}/{city}/{stem}{_LABEL_SUFFIX}"
    image_where = images.describe(image_path)
    image_bytes, size = common.rgb_image_bytes(images.read(image_path), image_where)
    if label_path.lower() in label_paths:
        label_path = label_paths[label_path.lower()]
        label_where = labels.describe(label_path)
        label_ids = common.label_array(labels.read(label_path), label_where)
        common.check_same_size(size, label_ids, image_where, label_where)
        train_ids = label_ids_to_train_ids(label_ids)
    elif folder == "test":
        # Test labels are withheld by the benchmark; an all-ignore map keeps the format.
        train_ids = np.full(size, IGNORE_LABEL, np.uint8)
    else:
        raise common.MissingDownloadError(
            f"cityscapes: label {labels.describe(label_path)} for image {image_where} is "
            f"missing; {LABELS_ARCHIVE.archive} from {DOWNLOADS_URL} is incomplete. "
            "Download it again."
        )
    return {
        "image": image_bytes,
        "label": common.encode_png(train_ids),
        "file_name": image_path.removeprefix(f"{IMAGES.extracted}/"),
    }
