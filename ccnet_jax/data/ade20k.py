"""ADE20K SceneParsing (150 classes, ADEChallengeData2016): the TFDS builder.

Label 0 ("other") becomes 255 (ignore) and the 150 classes shift down by one,
so train ids are 0..149. The release has no test annotations: the builder
writes `train` (20 210 images) and `validation` (2 000).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ccnet_jax.data import common
from ccnet_jax.labels import IGNORE_LABEL

NUM_CLASSES = 150
CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

# Raw annotation value -> train id: 0 ("other") and anything above 150 are ignored.
RAW_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_LABEL, dtype=np.uint8)
RAW_TO_TRAIN_ID[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)


def palette() -> np.ndarray:
    """(150, 3) uint8 RGB colours for visualisation, fixed by a seed (not the official ones)."""
    return np.random.default_rng(150).integers(0, 256, size=(NUM_CLASSES, 3), dtype=np.uint8)


ARCHIVE = common.ManualFile(
    archive="ADEChallengeData2016.zip",
    url="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    extracted="ADEChallengeData2016",
    note="about 0.9 GB, public",
)
MANUAL_FILES = (ARCHIVE,)

_SPLIT_DIRS = {"train": "training", "validation": "validation"}
# Images per split in the official ADEChallengeData2016.zip.
OFFICIAL_COUNTS = {"train": 20210, "validation": 2000}


def locate_manual_files(manual_dir: Path) -> Path:
    """The zip or the folder holding `ADEChallengeData2016/`; raises naming what to fetch."""
    found = common.find_tree(Path(manual_dir), ARCHIVE)
    if found is None:
        raise common.MissingDownloadError(
            common.missing_download_message("ade20k", [ARCHIVE], Path(manual_dir))
        )
    return found


class CcnetAde20k(tfds.core.GeneratorBasedBuilder):
    """ADE20K SceneParsing, 150 classes as train ids 0..149, 255 = ignore ("other")."""

    name = "ccnet_ade20k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016, labels shifted down by one, 0 -> 255."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {ARCHIVE.url} into the manual folder (zip or extracted folder)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ADE20K SceneParsing 150 classes; label = class - 1, 255 = other/ignore.",
            features=tfds.features.FeaturesDict(
                {
                    # Original JPEG bytes, or PNG for the few files not stored as RGB.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage="http://sceneparsing.csail.mit.edu/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        location = locate_manual_files(dl_manager.manual_dir)
        return {split: self._generate_examples(location, split) for split in _SPLIT_DIRS}

    def _generate_examples(self, location: Path, split: str) -> Iterator[tuple[str, dict]]:
        folder = _SPLIT_DIRS[split]
        with common.FileTree(location, ARCHIVE.extracted) as tree:
            pairs = _image_pairs(tree, folder)
            # Keyed by lower case, as the images are matched: an annotation may differ in its extension's case.
            label_paths = {p.lower(): p for p in tree.files(f"{ARCHIVE.extracted}/annotations/{folder}")}
            common.check_labels_have_images("ade20k", tree, label_paths.values(), ".png", pairs,
                                            tree.describe(f"{ARCHIVE.extracted}/images/{folder}/"), ARCHIVE)
            for image_path, stem in pairs:
                yield stem, _example(tree, label_paths, image_path, stem, folder)
        common.warn_unofficial_count("ade20k", split, len(pairs), OFFICIAL_COUNTS[split])


def _image_pairs(tree: common.FileTree, folder: str) -> list[tuple[str, str]]:
    """(image path, stem) of a split's images; refuses a split without any."""
    root = ARCHIVE.extracted
    pairs = list(common.iter_pairs(tree.files(f"{root}/images/{folder}"), ".jpg"))
    if not pairs:
        raise common.MissingDownloadError(
            f"ade20k: no *.jpg images under {tree.describe(f'{root}/images/{folder}/')}; "
            f"{ARCHIVE.archive} is incomplete. Download it again from {ARCHIVE.url}."
        )
    return pairs


def _example(tree: common.FileTree, label_paths: dict[str, str], image_path: str, stem: str, folder: str) -> dict:
    """One stored example: the image and its annotation as train ids."""
    root = ARCHIVE.extracted
    label_path = f"{root}/annotations/{folder}/{stem}.png"
    image_where = tree.describe(image_path)
    if label_path.lower() not in label_paths:
        raise common.MissingDownloadError(
            f"ade20k: annotation {tree.describe(label_path)} for {image_where} is missing; "
            f"{ARCHIVE.archive} is incomplete. Download it again from {ARCHIVE.url}."
        )
    label_path = label_paths[label_path.lower()]
    image_bytes, size = common.rgb_image_bytes(tree.read(image_path), image_where)
    label_where = tree.describe(label_path)
    raw = common.label_array(tree.read(label_path), label_where)
    common.check_same_size(size, raw, image_where, label_where)
    return {
        "image": image_bytes,
        "label": common.encode_png(RAW_TO_TRAIN_ID[raw]),
        "file_name": image_path.removeprefix(f"{root}/images/"),
    }
