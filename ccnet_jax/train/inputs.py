"""Input pipelines of an experiment config: training and evaluation iterators over a mesh."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.sharding import Mesh

from ccnet_jax.config import ExperimentConfig
from ccnet_jax.data import DATASETS, dataset_spec, load_split
from ccnet_jax.data.pipeline import InputIterator, PipelineConfig, make_eval_iterator, make_train_iterator
from ccnet_jax.data.transforms import (
    CAFFE_BGR,
    IMAGENET_RGB,
    EvalConfig,
    Normalization,
    PhotometricConfig,
    TrainAugmentConfig,
)

NORMALIZATIONS: dict[str, Normalization] = {"caffe_bgr": CAFFE_BGR, "imagenet_rgb": IMAGENET_RGB}


class Prefix:
    """The first `count` examples of a source (picklable, for grain workers)."""

    def __init__(self, source: Sequence[dict[str, Any]], count: int):
        self.source = source
        self.count = min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(index)]


def check_classes(config: ExperimentConfig) -> None:
    """Raises if the model's class count differs from the dataset's: with fewer, the loss would count the
    pixels of the classes past the model's last at zero cost and the metrics would drop them; with more,
    it predicts classes that the dataset has no label or name for."""
    spec, classes = dataset_spec(config.data.name), config.model.num_classes
    if spec.num_classes == classes:
        return
    # A trained or converted model keeps its classes: name the datasets it can be used on.
    fitting = [f"--set data.name={name}" for name, other in DATASETS.items() if other.num_classes == classes]
    raise ValueError(
        f"model.num_classes is {classes} but {config.data.name} has {spec.num_classes} classes; pass "
        f"--set model.num_classes={spec.num_classes} (a config without model.num_classes takes its dataset's)"
        + (f", or for a model of {classes} classes {' or '.join(fitting)}" if fitting else "")
    )


def train_iterator(config: ExperimentConfig, mesh: Mesh) -> InputIterator:
    """Endless shuffled, augmented global batches of `train.batch_size` sharded over the mesh."""
    data = config.data
    source = load_split(data.name, data.train_split, data.data_dir, config=data.builder_config)
    augment = TrainAugmentConfig(
        crop_size=tuple(data.crop_size),
        scales=tuple(data.scales),
        scale_range=data.scale_range,
        base_size=data.base_size,
        flip_prob=data.flip_prob,
        normalization=NORMALIZATIONS[data.normalization],
        photometric=PhotometricConfig() if data.photometric else None,
    )
    pipeline = PipelineConfig(
        global_batch_size=config.train.batch_size,
        seed=config.train.seed,
        num_workers=data.num_workers,
        read_threads=data.read_threads,
    )
    return make_train_iterator(source, pipeline, augment, mesh)


def eval_source(config: ExperimentConfig, mesh: Mesh, split: str | None = None) -> tuple[Sequence[dict[str, Any]], int]:
    """(examples of `split` (default data.eval_split), global batch size) of an evaluation; raises
    if either cannot be used, which training checks before its first step."""
    data = config.data
    source = load_split(data.name, split or data.eval_split, data.data_dir, config=data.builder_config)
    if config.eval.max_images > 0:
        source = Prefix(source, config.eval.max_images)
    batch = config.eval.batch_size or mesh.devices.size
    if batch % mesh.devices.size:
        raise ValueError(f"eval.batch_size {batch} must be a multiple of the {mesh.devices.size} devices; pass "
                         f"--set eval.batch_size=N with N a multiple of {mesh.devices.size}, or 0 for one image per "
                         "device")
    return source, batch


def eval_iterator(config: ExperimentConfig, mesh: Mesh, split: str | None = None) -> InputIterator:
    """One ordered pass over `split` (default data.eval_split), `eval.batch_size` images per global batch."""
    data = config.data
    source, batch = eval_source(config, mesh, split)
    eval_config = EvalConfig(
        resize=data.eval_resize, pad_to=config.eval.pad_to, normalization=NORMALIZATIONS[data.normalization]
    )
    pipeline = PipelineConfig(global_batch_size=batch, num_workers=data.num_workers, read_threads=data.read_threads)
    return make_eval_iterator(source, pipeline, eval_config, mesh)
