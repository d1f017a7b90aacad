"""Gradient accumulation: `train.accumulate_steps` micro-batches per optimizer step."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ccnet_jax.models import CCNetConfig
from ccnet_jax.train import losses, optim
from ccnet_jax.train import state as state_lib
from ccnet_jax.train import step as step_lib
from tests.train_helpers import TINY_MODEL

LOSS = losses.LossConfig(ohem=True, ohem_min_kept=500)


def _setup(devices):
    mesh = step_lib.make_mesh(devices=devices)
    config = CCNetConfig(**{**TINY_MODEL, "blocks": tuple(TINY_MODEL["blocks"])})
    model = state_lib.build_model(config, seed=0, mesh=mesh)
    tx = optim.make_optimizer(optim.OptimizerConfig(), 10)
    parts, state = state_lib.init_state(model, tx, seed=0, mesh=mesh)
    return mesh, tx, parts, state


def _batch(images: int):
    rng = np.random.default_rng(1)
    batch = {"image": rng.normal(size=(images, 32, 40, 3)).astype(np.float32) * 50,
             "label": rng.integers(0, 7, (images, 32, 40)).astype(np.uint8)}
    batch["label"][:, :4] = 255
    return batch


def _placed(mesh, batch):
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def test_micro_batches_take_every_kth_image_so_each_device_keeps_its_own():
    images = np.arange(8)
    np.testing.assert_array_equal(step_lib.micro_batches(images, 2), [[0, 2, 4, 6], [1, 3, 5, 7]])
    # Over 2 devices (images 0-3 on the first), each micro-batch's first half is the first device's.
    mesh = step_lib.make_mesh(devices=jax.devices()[:2])
    split = jax.jit(lambda x: jax.lax.with_sharding_constraint(
        step_lib.micro_batches(x, 2), NamedSharding(mesh, PartitionSpec(None, "data"))))
    placed = jax.device_put(np.arange(8.0), NamedSharding(mesh, PartitionSpec("data")))
    hlo = split.lower(placed).compile().as_text()
    assert not any(op in hlo for op in ("all-to-all", "collective-permute", "all-gather")), "the split moved data"
    np.testing.assert_array_equal(np.asarray(split(placed)), [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_accumulated_step_is_one_update_from_the_mean_of_the_micro_batches_gradients():
    assert jax.device_count() >= 2, "tests/conftest.py should provide 4 CPU devices"
    mesh, tx, parts, state = _setup(jax.devices()[:2])
    batch = _batch(8)
    # By hand: micro-batch i = images i, i + 2, ...; BatchNorm's running statistics carried from one
    # to the next; dropout keyed by the step's key folded with i; one optimizer update.
    key = step_lib.dropout_key(state)
    one = jax.jit(lambda params, stats, key, micro: step_lib.loss_and_updates(parts, params, stats, key, micro, LOSS))
    stats, results = state.batch_stats, []
    for i in range(2):
        loss, terms, grads, stats = one(state.params, stats, jax.random.fold_in(key, i),
                                        _placed(mesh, {k: v[i::2] for k, v in batch.items()}))
        results.append((loss, terms, grads))
    loss, terms, grads = jax.tree.map(lambda a, b: (a + b) / 2, *results)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    want_params = jax.device_get(optax.apply_updates(state.params, updates))
    want_stats = jax.device_get(stats)

    train_step = step_lib.make_train_step(parts, tx, LOSS, mesh, accumulate_steps=2)
    new_state, metrics = train_step(state, _placed(mesh, batch))
    assert int(new_state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    for name in ("main", "aux"):
        np.testing.assert_allclose(float(metrics[name]), float(terms[name]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_batch_that_does_not_split_is_refused():
    mesh, tx, parts, state = _setup(jax.devices()[:2])
    with pytest.raises(ValueError, match="accumulate_steps must be an integer >= 1"):
        step_lib.make_train_step(parts, tx, LOSS, mesh, accumulate_steps=0)
    train_step = step_lib.make_train_step(parts, tx, LOSS, mesh, accumulate_steps=4)
    with pytest.raises(ValueError, match="a batch of 4 images does not split into 4 micro-batches that divide "
                                         "over 2 devices; use a batch that is a multiple of 8"):
        train_step(state, _placed(mesh, _batch(4)))
