"""Dataset registry, preparation and the random-access reading API.

`load_split(name, split, data_dir)` returns a `SplitSource`: `len()` and
integer indexing give `{"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W)
train ids with 255 = ignore, "file_name": str}`. The source holds only paths
and opens the ArrayRecord files lazily, so grain can pickle it into worker
processes cheaply.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from ccnet_jax.data import ade20k, cityscapes, common, long_range
from ccnet_jax.labels import IGNORE_LABEL


class _OpenCvAdvice(logging.Filter):
    """Drops tensorflow-datasets' "OpenCV is not installed" warning, printed by every run and worker.
    PIL decodes as fast for PNG (Cityscapes) and a few ms slower per JPEG (ADE20K), which the
    augmentation dwarfs (experiments/bench_decode.py), so the advice does not apply here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("OpenCV is not installed")


logging.getLogger("absl").addFilter(_OpenCvAdvice())


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the project needs to know about one dataset."""

    builder: type[tfds.core.GeneratorBasedBuilder]
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    locate: Callable[[Path], Any] | None  # checks the manual downloads, raising a MissingDownloadError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {
    "cityscapes": DatasetSpec(
        builder=cityscapes.CcnetCityscapes,
        class_names=cityscapes.CLASS_NAMES,
        splits=("train", "validation", "test"),
        locate=cityscapes.locate_manual_files,
    ),
    "ade20k": DatasetSpec(
        builder=ade20k.CcnetAde20k,
        class_names=ade20k.CLASS_NAMES,
        splits=("train", "validation"),
        locate=ade20k.locate_manual_files,
    ),
    "long_range": DatasetSpec(
        builder=long_range.CcnetLongRange,
        class_names=long_range.CLASS_NAMES,
        splits=("train", "validation", "test"),
        locate=None,
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of `name`; raises with the valid names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def default_manual_dir(data_dir: str | os.PathLike) -> Path:
    """Where tfds looks for manual downloads when no folder is given: DATA_DIR/downloads/manual."""
    return Path(data_dir) / "downloads" / "manual"


def _builder(name: str, data_dir: str | os.PathLike, config: str | None) -> tfds.core.DatasetBuilder:
    spec = dataset_spec(name)
    if config is not None and config not in {c.name for c in spec.builder.BUILDER_CONFIGS}:
        configs = [c.name for c in spec.builder.BUILDER_CONFIGS] or ["none"]
        raise ValueError(f"{name} has no configuration {config!r}; available: {', '.join(configs)}")
    return spec.builder(data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def prepared_dir(name: str, data_dir: str | os.PathLike, config: str | None = None) -> Path:
    """The folder that holds the prepared dataset once preparation has completed."""
    return Path(os.fspath(_builder(name, data_dir, config).data_path))


def is_prepared(name: str, data_dir: str | os.PathLike, config: str | None = None) -> bool:
    """True only for a completed preparation (tfds renames its temp folder at the very end)."""
    builder = _builder(name, data_dir, config)
    return Path(os.fspath(builder.data_path)).is_dir() and builder.is_prepared()


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: str | None = None,
) -> Path:
    """Builds dataset `name` as ArrayRecord files under `data_dir`; returns the prepared folder.

    `manual_dir` holds the manual downloads (zips or extracted folders); it
    defaults to DATA_DIR/downloads/manual. Missing downloads raise
    `MissingDownloadError` before anything is written. tfds writes into a
    temporary `incomplete.*` folder and renames it only when every split is
    written, so an interrupted run never looks complete. A completed
    preparation is returned as it is, even once the downloads are deleted.
    """
    spec = dataset_spec(name)
    builder = _builder(name, data_dir, config)
    data_path = Path(os.fspath(builder.data_path))
    if data_path.is_dir() and builder.is_prepared():
        return data_path
    manual = Path(manual_dir) if manual_dir is not None else default_manual_dir(data_dir)
    if spec.locate is not None:
        spec.locate(manual)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
    )
    return data_path


def _not_prepared_message(name: str, data_dir: Path, data_path: Path, config: str | None) -> str:
    command = f"ccnet data prepare {name} --data-dir {shlex.quote(os.fspath(data_dir))}"
    if config is not None:
        command += f" --config {shlex.quote(config)}"
    message = f"dataset {name!r} is not prepared: {data_path} does not hold a completed preparation."
    leftovers = common.incomplete_leftovers(data_path)
    if leftovers:
        message += (
            f" {len(leftovers)} interrupted preparation(s) left {', '.join(map(str, leftovers))}; "
            "they are never used and can be deleted."
        )
    configs = [c.name for c in dataset_spec(name).builder.BUILDER_CONFIGS]
    chosen = config if config is not None else next(iter(configs), None)  # tfds takes the first by default
    others = [other for other in configs if other != chosen and is_prepared(name, data_dir, other)]
    if others:
        # `ccnet data info long_range` after preparing the tiny one suggested building the 3000-image default.
        message += (f" Prepared there: configuration {', '.join(map(repr, others))} (`ccnet data` takes it as "
                    f"--config {others[0]}, the other commands as --set data.builder_config={others[0]}).")
    return message + f" Prepare it with: {command}"


class SplitSource:
    """Random-access view of one prepared split (len, indexing); picklable for grain workers."""

    def __init__(self, name: str, split: str, data_path: Path, length: int):
        self.name = name
        self.split = split
        self.data_path = Path(data_path)
        self._length = length
        self._source = None

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_source"] = None  # reopened in the worker: file handles do not pickle
        return state

    def _open(self):
        if self._source is None:
            builder = tfds.builder_from_directory(os.fspath(self.data_path))
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} of {self._length}")
        record = self._open()[index % self._length]
        return {
            "image": record["image"],
            "label": record["label"][..., 0],
            "file_name": record["file_name"].decode("utf-8"),
        }

    def __repr__(self) -> str:
        return f"SplitSource({self.name}/{self.split}, {self._length} examples, {self.data_path})"


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike,
    *,
    config: str | None = None,
) -> SplitSource:
    """Opens a prepared split for random access.

    Args:
      name: "cityscapes", "ade20k" or "long_range".
      split: "train", "validation" or "test" (ADE20K has no test split).
      data_dir: the folder given to `ccnet data prepare --data-dir`.
      config: builder configuration (long_range: "default" or "tiny").

    Returns:
      A `SplitSource`; each example is {"image": uint8 (H, W, 3) RGB, "label":
      uint8 (H, W), 255 = ignore, "file_name": str}.
    """
    spec = dataset_spec(name)
    if split not in spec.splits:
        raise ValueError(f"{name} has no split {split!r}; available: {', '.join(spec.splits)}")
    builder = _builder(name, data_dir, config)
    data_path = Path(os.fspath(builder.data_path))
    if not (data_path.is_dir() and builder.is_prepared()):
        raise common.DatasetNotPreparedError(_not_prepared_message(name, Path(data_dir), data_path, config))
    length = builder.info.splits[split].num_examples
    return SplitSource(name, split, data_path, length)


class ShardSource:
    """Examples `indices` of `source`, then `padding` copies of the first one flagged invalid.

    Adds "index" (int32, position in the full split, -1 for padding) and
    "valid" (bool) to each example, so evaluation can give every JAX process
    the same number of batches and still count each example exactly once.
    """

    def __init__(self, source: Sequence[dict[str, Any]], indices: Sequence[int], padding: int):
        if not len(indices):
            raise ValueError("a shard needs at least one example; use fewer processes for this split")
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.padding = int(padding)

    def __len__(self) -> int:
        return len(self.indices) + self.padding

    def __getitem__(self, position: int) -> dict[str, Any]:
        position = int(position)
        valid = position < len(self.indices)
        index = int(self.indices[position if valid else 0])
        example = dict(self.source[index])
        if not valid:
            example["label"] = np.full_like(example["label"], IGNORE_LABEL)
        example["index"] = np.int32(index if valid else -1)
        example["valid"] = np.bool_(valid)
        return example
