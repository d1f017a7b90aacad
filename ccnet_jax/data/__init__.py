"""Datasets (TFDS builders prepared as ArrayRecord, read without TensorFlow) and grain pipelines.

    from ccnet_jax.data import load_split
    from ccnet_jax.data.pipeline import PipelineConfig, make_train_iterator
    from ccnet_jax.data.transforms import TrainAugmentConfig

The pipeline module imports jax; it is not imported here so that grain's worker
processes, which import this package to unpickle sources and transforms, stay light.
"""

from ccnet_jax.data.common import (
    SPLITS,
    CorruptImageError,
    DataError,
    DatasetNotPreparedError,
    MissingDownloadError,
)
from ccnet_jax.data.sources import DATASETS, SplitSource, dataset_spec, is_prepared, load_split, prepare
from ccnet_jax.labels import IGNORE_LABEL

__all__ = [
    "DATASETS",
    "IGNORE_LABEL",
    "SPLITS",
    "CorruptImageError",
    "DataError",
    "DatasetNotPreparedError",
    "MissingDownloadError",
    "SplitSource",
    "dataset_spec",
    "is_prepared",
    "load_split",
    "prepare",
]
