"""grain pipelines: determinism, resume, per-process shares, global arrays, worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from ccnet_jax.data import load_split, prepare
from ccnet_jax.data.pipeline import PipelineConfig, make_eval_iterator, make_train_iterator, shard_range
from ccnet_jax.data.transforms import EvalConfig, Normalization, TrainAugmentConfig

# Identity normalisation and no resampling: an output pixel is its example's id.
IDENTITY = Normalization("rgb", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
ID_AUGMENT = TrainAugmentConfig(crop_size=(4, 4), scales=(1.0,), flip_prob=0.0, normalization=IDENTITY)


def id_source(n: int) -> list[dict]:
    """Example i: 4x4 image and label filled with i."""
    return [
        {"image": np.full((4, 4, 3), i, np.uint8), "label": np.full((4, 4), i, np.uint8), "file_name": f"{i}.png"}
        for i in range(n)
    ]


def batch_ids(batch) -> list[int]:
    return [int(x) for x in np.asarray(batch["image"])[:, 0, 0, 0]]


@pytest.fixture(scope="module")
def tiny_long_range(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    prepare("long_range", data_dir, config="tiny")
    return data_dir


SMALL_AUGMENT = TrainAugmentConfig(crop_size=(48, 64), scales=(0.5, 1.0, 1.5))


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))


def test_deterministic_for_a_seed(tiny_long_range):
    source = load_split("long_range", "train", tiny_long_range, config="tiny")
    config = PipelineConfig(global_batch_size=4, seed=3)
    with (make_train_iterator(source, config, SMALL_AUGMENT) as a,
          make_train_iterator(source, config, SMALL_AUGMENT) as b):
        first, second = take(a, 3), take(b, 3)
    assert_same_batches(first, second)
    assert first[0]["image"].shape == (4, 48, 64, 3) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].shape == (4, 48, 64) and first[0]["label"].dtype == np.uint8
    other = PipelineConfig(global_batch_size=4, seed=4)
    with make_train_iterator(source, other, SMALL_AUGMENT) as c:
        assert not np.array_equal(take(c, 1)[0]["image"], first[0]["image"])


def test_epochs_cover_the_data_in_new_orders():
    config = PipelineConfig(global_batch_size=2, seed=0, shard=grain.sharding.NoSharding())
    with make_train_iterator(id_source(6), config, ID_AUGMENT) as iterator:
        epochs = [sum((batch_ids(b) for b in take(iterator, 3)), []) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(6))
    assert len({tuple(e) for e in epochs}) == 3


def test_resume_mid_epoch_gives_the_same_batches():
    source = id_source(12)  # 6 batches per epoch
    config = PipelineConfig(global_batch_size=2, seed=11, shard=grain.sharding.NoSharding())
    with make_train_iterator(source, config, ID_AUGMENT) as iterator:
        take(iterator, 4)
        state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON checkpoint
        expected = take(iterator, 6)  # crosses into the second epoch
    with make_train_iterator(source, config, ID_AUGMENT) as resumed:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 6), expected)


@pytest.mark.slow
def test_workers_match_in_process_and_resume(tiny_long_range):
    source = load_split("long_range", "train", tiny_long_range, config="tiny")
    in_process = PipelineConfig(global_batch_size=4, seed=5)
    with_workers = PipelineConfig(global_batch_size=4, seed=5, num_workers=2)
    with make_train_iterator(source, in_process, SMALL_AUGMENT) as reference:
        expected = take(reference, 7)
    with make_train_iterator(source, with_workers, SMALL_AUGMENT) as iterator:
        assert_same_batches(take(iterator, 3), expected[:3])
        state = iterator.get_state()
    with make_train_iterator(source, with_workers, SMALL_AUGMENT) as resumed:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 4), expected[3:])


def test_shard_range_is_a_partition():
    for n in (0, 1, 7, 10):
        for count in (1, 2, 3):
            ranges = [shard_range(n, grain.sharding.ShardOptions(i, count)) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("size", [10, 11])
def test_two_processes_train_on_disjoint_shares_in_step(size):
    source = id_source(size)
    seen = []
    for index in (0, 1):
        config = PipelineConfig(
            global_batch_size=2, seed=1, num_epochs=1, shard=grain.sharding.ShardOptions(index, 2)
        )
        with make_train_iterator(source, config, ID_AUGMENT) as iterator:
            assert len(iterator) == 5
            seen.append(sum((batch_ids(b) for b in iterator), []))
    assert len(seen[0]) == len(seen[1]) == 5  # same number of steps, else a global batch would hang
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) <= set(range(6)) and set(seen[1]) <= set(range(size // 2 + size % 2, size))
    if size == 10:
        assert sorted(seen[0] + seen[1]) == list(range(10))


def test_two_processes_evaluate_every_example_once():
    source = id_source(7)
    eval_config = EvalConfig(normalization=IDENTITY)
    shares = []
    lengths = []
    for index in (0, 1):
        config = PipelineConfig(global_batch_size=4, shard=grain.sharding.ShardOptions(index, 2))
        with make_eval_iterator(source, config, eval_config) as iterator:
            lengths.append(len(iterator))
            batches = list(iterator)
        assert len(batches) == len(iterator) == 2  # both processes step together
        shares.append(batches)
    valid_ids = [
        [int(i) for b in batches for i, v in zip(b["index"], b["valid"]) if v] for batches in shares
    ]
    assert set(valid_ids[0]).isdisjoint(valid_ids[1])
    assert sorted(valid_ids[0] + valid_ids[1]) == list(range(7))
    for batches in shares:
        for batch in batches:
            for i in range(len(batch["index"])):
                if batch["valid"][i]:
                    assert batch["image"][i, 0, 0, 0] == batch["index"][i]
                    assert batch["file_name"][i] == f"{batch['index'][i]}.png"
                else:  # padding never counts: all-ignore label
                    assert batch["index"][i] == -1 and np.all(batch["label"][i] == 255)


def test_global_arrays_on_a_mesh(tiny_long_range):
    source = load_split("long_range", "validation", tiny_long_range, config="tiny")
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    config = PipelineConfig(global_batch_size=4, seed=2)
    with make_train_iterator(source, config, SMALL_AUGMENT, mesh=mesh) as on_mesh:
        batch = next(on_mesh)
    with make_train_iterator(source, config, SMALL_AUGMENT) as host:
        reference = next(host)
    for key in ("image", "label"):
        assert isinstance(batch[key], jax.Array)
        assert batch[key].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(batch[key]), reference[key])
    with make_eval_iterator(source, config, EvalConfig(), mesh=mesh) as evaluation:
        batch = next(evaluation)
    assert isinstance(batch["valid"], jax.Array) and isinstance(batch["file_name"], np.ndarray)
    wrong = PipelineConfig(global_batch_size=4, shard=grain.sharding.ShardOptions(1, 2))
    with pytest.raises(ValueError, match="one share per process"):
        make_train_iterator(source, wrong, SMALL_AUGMENT, mesh=mesh)


def test_global_arrays_split_over_two_devices(tiny_long_range):
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from ccnet_jax.data import load_split
        from ccnet_jax.data.pipeline import PipelineConfig, make_train_iterator
        from ccnet_jax.data.transforms import TrainAugmentConfig
        source = load_split("long_range", "train", {str(tiny_long_range)!r}, config="tiny")
        mesh = jax.make_mesh((2,), ("data",))
        augment = TrainAugmentConfig(crop_size=(48, 64), scales=(1.0,))
        with make_train_iterator(source, PipelineConfig(global_batch_size=4), augment, mesh=mesh) as it:
            batch = next(it)
        shards = batch["image"].addressable_shards
        assert len(shards) == 2, shards
        assert {{s.data.shape for s in shards}} == {{(2, 48, 64, 3)}}
        assert {{s.index[0].start for s in shards}} == {{0, 2}}
        print("ok")
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_batch_size_errors_are_explained():
    with pytest.raises(ValueError, match="multiple of the 2 data shards"):
        make_train_iterator(
            id_source(8), PipelineConfig(global_batch_size=3, shard=grain.sharding.ShardOptions(0, 2)), ID_AUGMENT
        )
    config = PipelineConfig(global_batch_size=4, shard=grain.sharding.NoSharding())
    with pytest.raises(ValueError, match="fewer than its batch"):
        make_train_iterator(id_source(3), config, ID_AUGMENT)
