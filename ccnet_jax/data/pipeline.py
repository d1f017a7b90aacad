"""grain input pipelines that yield global, data-sharded `jax.Array` batches.

Training: each JAX process takes a contiguous share of the split, shuffles it
(a new order every epoch), augments every example with a generator seeded by
(seed, process share, epoch, position), and batches its `global_batch_size /
process_count` examples; `jax.make_array_from_process_local_data` then joins
the processes' batches into one array sharded over the mesh's data axis. All
randomness comes from the seed, so the batches do not depend on the number of
worker processes, and `get_state` / `set_state` resume exactly where a run
stopped.

Evaluation: one pass; every process gets the same number of batches, the last
ones padded with copies flagged `valid = False` whose labels are all 255, so
each example is counted exactly once.

Evaluation images of different sizes are batched by padding (with 0 after
normalisation) to the batch's largest, rounded up to a multiple of 64; labels
are always padded (with 255) that way, so they take few shapes. All processes
pad to the same size. Each distinct image shape compiles once: a batch of one
image keeps its size, and `eval.pad_to` gives every batch one image shape.

Batches are dicts of NHWC arrays: "image" float32 (B, H, W, 3), "label" uint8
(B, H, W), plus for evaluation "valid" bool (B,), "index" int32 (B,),
"height"/"width" int32 (B,) (the image before padding), "label_height" /
"label_width" int32 (B,) (the label before padding) and "file_name" (a
host-local numpy str array of this process's B / process_count names).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from ccnet_jax.data.sources import ShardSource
from ccnet_jax.data.transforms import EvalConfig, EvalTransform, TrainAugmentConfig, TrainTransform, pad_to_size
from ccnet_jax.labels import IGNORE_LABEL
from ccnet_jax.preemption import StopTogether

PAD_MULTIPLE = 64  # mixed-size evaluation batches are padded to multiples of this
_PAD_VALUES = {"image": 0.0, "label": IGNORE_LABEL}


def _rounded_up(size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE for n in size)


class PadBatch:
    """grain batch function: stacks examples, padding "image" to the largest in the batch when sizes
    differ, and "label" always, rounded up to PAD_MULTIPLE. Label padding is ignored (255) and
    does not change the predictions, so labels always take few shapes; image padding is seen by
    the network, so a batch of equal images is left as it is."""

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {}
        for key in examples[0]:
            values = [np.asarray(example[key]) for example in examples]
            if key == "label" or (key in _PAD_VALUES and len({v.shape for v in values}) > 1):
                size = _rounded_up(tuple(max(v.shape[i] for v in values) for i in (0, 1)))
                values = [pad_to_size(v, size, _PAD_VALUES[key], key) for v in values]
            out[key] = np.stack(values)
        return out


def _agree_on_sizes(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pads this process's "image" and "label" batches to the largest over all processes, which a
    global array needs."""
    from jax.experimental import multihost_utils

    keys = [key for key in _PAD_VALUES if key in local]
    mine = np.array([local[key].shape[1:3] for key in keys], np.int32)
    largest = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, *mine.shape).max(axis=0)
    out = dict(local)
    for key, size in zip(keys, largest):
        if tuple(size) != local[key].shape[1:3]:
            out[key] = np.stack([pad_to_size(x, tuple(size), _PAD_VALUES[key], key) for x in local[key]])
    return out


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batching, seeding, sharding and parallelism of an input pipeline.

    Attributes:
      global_batch_size: examples per step over all JAX processes.
      seed: fixes the shuffle order and every augmentation.
      num_workers: worker processes per JAX process (0: read in this process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads per process (or per worker) preparing batches.
      prefetch_buffer_size: batches prepared ahead by those threads.
      shard: which share of the data this process reads; None means
        `grain.sharding.ShardByJaxProcess()` (process i of n reads share i).
      num_epochs: training passes over the data; None repeats forever.
    """

    global_batch_size: int
    seed: int = 0
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    prefetch_buffer_size: int = 2
    shard: grain.sharding.ShardOptions | None = None
    num_epochs: int | None = None

    def shard_options(self) -> grain.sharding.ShardOptions:
        return self.shard if self.shard is not None else grain.sharding.ShardByJaxProcess()

    def local_batch_size(self) -> int:
        count = self.shard_options().shard_count
        if self.global_batch_size <= 0 or self.global_batch_size % count:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a positive multiple of the "
                f"{count} data shards (JAX processes)"
            )
        return self.global_batch_size // count


def shard_range(num_examples: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of this shard's contiguous share; the remainder goes to the first shards
    unless `shard.drop_remainder`, in which case every share has the same size."""
    per_shard, remainder = divmod(num_examples, shard.shard_count)
    start = per_shard * shard.shard_index
    end = start + per_shard
    if not shard.drop_remainder:
        start += min(shard.shard_index, remainder)
        end += min(shard.shard_index + 1, remainder)
    return start, end


def _seeds(seed: int, shard_index: int, count: int) -> list[int]:
    # Different shares must not replay the same augmentation sequence.
    return [int(s) for s in np.random.SeedSequence([seed, shard_index]).generate_state(count)]


def _read_options(config: PipelineConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size)


def _start(dataset: grain.MapDataset, config: PipelineConfig) -> grain.DatasetIterator:
    iter_dataset = dataset.to_iter_dataset(_read_options(config))
    if config.num_workers > 0:
        # grain reads its absl flags in this process; programs not run through
        # absl.app never parse them, and reading unparsed flags raises.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return iter(iter_dataset)


def batch_sharding(
    mesh: jax.sharding.Mesh | None, config: PipelineConfig, data_axis: str | Sequence[str]
) -> jax.sharding.NamedSharding | None:
    """Sharding of the batch dimension over `data_axis` (None without a mesh); checks that
    this process reads exactly its own share, as global arrays require."""
    if mesh is None:
        return None
    shard = config.shard_options()
    if (shard.shard_index, shard.shard_count) != (jax.process_index(), jax.process_count()):
        raise ValueError(
            f"data shard {shard.shard_index}/{shard.shard_count} differs from JAX process "
            f"{jax.process_index()}/{jax.process_count()}: global arrays need one share per "
            "process (leave PipelineConfig.shard as None)"
        )
    axis = data_axis if isinstance(data_axis, str) else tuple(data_axis)
    # Checked here: jax would only object at the first batch, in terms of partition specs.
    devices = math.prod(mesh.shape[name] for name in ((axis,) if isinstance(axis, str) else axis))
    if config.global_batch_size % devices:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} must be a multiple of the {devices} devices "
            f"along the mesh's data axis {axis!r}; change the batch size or the mesh"
        )
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


class InputIterator:
    """Iterator of batches; `get_state`/`set_state` checkpoint the position exactly.

    With a mesh, numeric entries become global `jax.Array`s of global batch size
    sharded over `data_axis`; without one, every entry is this process's numpy
    batch.
    """

    def __init__(
        self,
        iterator: grain.DatasetIterator,
        global_batch_size: int,
        sharding: jax.sharding.NamedSharding | None,
        num_batches: int | None,
        *,
        mixed_sizes: bool = False,
    ):
        self._iterator: grain.DatasetIterator | None = iterator
        self._global_batch_size = global_batch_size
        self._sharding = sharding
        self._num_batches = num_batches
        self._mixed_sizes = mixed_sizes

    def __len__(self) -> int:
        """Batches in one pass (evaluation) or in all epochs (training with num_epochs set)."""
        if self._num_batches is None:
            raise TypeError("this training iterator repeats forever (num_epochs=None); it has no length")
        return self._num_batches

    def __iter__(self) -> InputIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            raise StopIteration
        try:
            element = self._read()
        except StopIteration:
            self.close()
            raise
        # Copies out of grain's shared memory, which is released when the worker's array dies.
        local = {key: np.array(value) for key, value in element.items()}
        if self._sharding is None:
            return local
        if self._mixed_sizes and jax.process_count() > 1:
            local = _agree_on_sizes(local)
        batch = {}
        for key, value in local.items():
            if value.dtype.kind in "biuf":
                global_shape = (self._global_batch_size,) + value.shape[1:]
                batch[key] = jax.make_array_from_process_local_data(self._sharding, value, global_shape)
            else:
                batch[key] = value
        return batch

    def _read(self) -> dict[str, Any]:
        """This process's next batch. The others would wait forever for its part of a global batch
        if its read failed (a damaged file in its share): with global arrays, all stop together."""
        if self._sharding is None:
            return next(self._iterator)
        with StopTogether("reading its share of a batch"):
            return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream (JSON-serialisable); restore it with `set_state`."""
        return self._open_iterator().get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._open_iterator().set_state(state)

    def _open_iterator(self) -> grain.DatasetIterator:
        if self._iterator is None:
            raise ValueError("the iterator is closed (or exhausted); make a new one")
        return self._iterator

    def close(self) -> None:
        """Stops worker processes; also happens when a pass ends. Idempotent."""
        if self._iterator is not None:
            self._iterator.close()
            # Dropping grain's iterator now lets its own finaliser run while the
            # interpreter is intact rather than during shutdown, where it fails noisily.
            self._iterator = None

    def __enter__(self) -> InputIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_iterator(
    source: Sequence[dict[str, Any]],
    config: PipelineConfig,
    augment: TrainAugmentConfig,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str | Sequence[str] = "data",
) -> InputIterator:
    """Training batches: shuffled (reshuffled every epoch), augmented, this process's share.

    Args:
      source: random-access examples, e.g. `load_split(name, "train", data_dir)`.
      config: batch size, seed, workers, sharding.
      augment: scale/crop/flip/normalisation settings.
      mesh: if given, batches are global arrays sharded over `data_axis`.

    Returns:
      An `InputIterator` of {"image": float32 (B, crop_h, crop_w, 3), "label": uint8 (B, crop_h, crop_w)}.
      With `config.num_epochs` set it stops after the same number of batches on
      every process: the smallest share's, so up to (processes - 1) examples of
      the larger shares are skipped per epoch.
    """
    sharding = batch_sharding(mesh, config, data_axis)
    shard = config.shard_options()
    local_batch = config.local_batch_size()
    start, end = shard_range(len(source), shard)
    if end - start < local_batch:
        raise ValueError(
            f"this process's share holds {end - start} examples, fewer than its batch of {local_batch}"
        )
    shuffle_seed, augment_seed = _seeds(config.seed, shard.shard_index, 2)
    dataset = (
        grain.MapDataset.source(source)[start:end]
        .shuffle(seed=shuffle_seed)
        .repeat(config.num_epochs)
        .random_map(TrainTransform(augment), seed=augment_seed)
        .batch(local_batch, drop_remainder=True)
    )
    num_batches = None
    if config.num_epochs is not None:
        # Shares may differ by one example; every process must stop after the same
        # step, or the others would wait forever for its part of a global batch.
        smallest_share = len(source) // shard.shard_count
        num_batches = smallest_share * config.num_epochs // local_batch
        dataset = dataset[:num_batches]
    return InputIterator(_start(dataset, config), config.global_batch_size, sharding, num_batches)


def make_eval_iterator(
    source: Sequence[dict[str, Any]],
    config: PipelineConfig,
    eval_config: EvalConfig,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str | Sequence[str] = "data",
) -> InputIterator:
    """One ordered pass over this process's share, padded so all processes yield `len()` batches.

    Images and labels of different sizes are padded per batch (see `PadBatch`);
    `config.seed`, `num_epochs` are unused.
    """
    sharding = batch_sharding(mesh, config, data_axis)
    shard = config.shard_options()
    if shard.drop_remainder:
        raise ValueError("evaluation must see every example: use a shard with drop_remainder=False")
    local_batch = config.local_batch_size()
    start, end = shard_range(len(source), shard)
    largest_share = math.ceil(len(source) / shard.shard_count)
    num_batches = math.ceil(largest_share / local_batch)
    padded = ShardSource(source, range(start, end), num_batches * local_batch - (end - start))
    dataset = grain.MapDataset.source(padded).map(EvalTransform(eval_config)).batch(local_batch, batch_fn=PadBatch())
    return InputIterator(_start(dataset, config), config.global_batch_size, sharding, num_batches, mixed_sizes=True)
