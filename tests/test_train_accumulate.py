"""Gradient accumulation: `train.accumulate_steps` micro-batches per optimizer step."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ccnet_jax.config import ConfigError
from ccnet_jax.models import CCNetConfig
from ccnet_jax.train import loop, losses, optim
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


@pytest.mark.parametrize("ohem", [True, False], ids=["ohem", "mean"])
def test_weighted_micro_batch_losses_add_up_to_the_whole_batch_loss(ohem):
    # What the step sums (BatchNorm aside, which only a network has): the micro-batches' losses,
    # weighted, are the loss of the batch taken whole, also where they hold different numbers of
    # ignored pixels. OHEM's groups are then those of the micro-batches (images 0 and 2, ...), so the
    # whole batch is taken in the micro-batches' order.
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(8, 8, 10, 7)), jnp.float32)
    labels = rng.integers(0, 7, (8, 32, 40)).astype(np.uint8)
    labels[0::2, :20] = 255  # micro-batch 0 of 2 holds far fewer valid pixels
    config = losses.LossConfig(ohem=ohem, ohem_min_kept=500)
    order = np.concatenate([np.arange(8)[i::2] for i in range(2)])
    whole = losses.segmentation_loss(logits[order], logits[order], jnp.asarray(labels[order]), config)[0]
    weights = losses.micro_batch_weights(step_lib.micro_batches(jnp.asarray(labels), 2), config)
    parts = [losses.segmentation_loss(logits[i::2], logits[i::2], jnp.asarray(labels[i::2]), config)[0]
             for i in range(2)]
    np.testing.assert_allclose(float(sum(w * part for w, part in zip(weights, parts))), float(whole), rtol=1e-6)
    if ohem:
        np.testing.assert_array_equal(weights, [0.5, 0.5])
    else:
        assert float(weights[0]) < 0.45  # not the plain mean of the two


@pytest.mark.parametrize("ohem", [True, False], ids=["ohem", "mean"])
def test_accumulated_step_is_one_update_from_the_micro_batches_weighted_gradients(ohem):
    assert jax.device_count() >= 2, "tests/conftest.py should provide 4 CPU devices"
    mesh, tx, parts, state = _setup(jax.devices()[:2])
    batch = _batch(8)
    batch["label"][0::2, :20] = 255
    config = losses.LossConfig(ohem=ohem, ohem_min_kept=500)
    # By hand: micro-batch i = images i, i + 2, ...; BatchNorm's running statistics carried from one
    # to the next; dropout keyed by the step's key folded with i; one optimizer update.
    key = step_lib.dropout_key(state)
    one = jax.jit(lambda params, stats, key, micro: step_lib.loss_and_updates(parts, params, stats, key, micro,
                                                                              config))
    weights = losses.micro_batch_weights(step_lib.micro_batches(jnp.asarray(batch["label"]), 2), config)
    stats, results = state.batch_stats, []
    for i in range(2):
        loss, terms, grads, stats = one(state.params, stats, jax.random.fold_in(key, i),
                                        _placed(mesh, {k: v[i::2] for k, v in batch.items()}))
        results.append(jax.tree.map(lambda x, w=weights[i]: w * x, (loss, terms, grads)))
    loss, terms, grads = jax.tree.map(lambda a, b: a + b, *results)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    want_params = jax.device_get(optax.apply_updates(state.params, updates))
    want_stats = jax.device_get(stats)

    train_step = step_lib.make_train_step(parts, tx, config, mesh, accumulate_steps=2)
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


def test_the_refusal_offers_more_micro_batches_first_as_they_keep_memory_down():
    settings = types.SimpleNamespace(batch_size=12, accumulate_steps=4)
    with pytest.raises(ConfigError, match=r"\(6 images a device\); pass --set train.accumulate_steps=6 or "
                                          r"--set train.accumulate_steps=3, or --set train.batch_size=16"):
        loop.check_micro_batches(settings, 2)
    loop.check_micro_batches(types.SimpleNamespace(batch_size=12, accumulate_steps=3), 2)
