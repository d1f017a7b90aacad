"""1 and 4 CPU devices give the same step on the same global batch (synchronised BN, global OHEM);
bfloat16 compute keeps float32 parameters and loss."""

import jax
import numpy as np
import pytest

from ccnet_jax.models import CCNetConfig
from ccnet_jax.train import losses, optim
from ccnet_jax.train import state as state_lib
from ccnet_jax.train import step as step_lib
from tests.train_helpers import TINY_MODEL


def _one_step(devices, batch, dtype=None):
    mesh = step_lib.make_mesh(devices=devices)
    config = CCNetConfig(**{**TINY_MODEL, "blocks": tuple(TINY_MODEL["blocks"])})
    model = state_lib.build_model(config, seed=0, mesh=mesh, dtype=dtype)
    tx = optim.make_optimizer(optim.OptimizerConfig(), 10)
    parts, state = state_lib.init_state(model, tx, seed=0, mesh=mesh)
    train_step = step_lib.make_train_step(parts, tx, losses.LossConfig(ohem=True, ohem_min_kept=500), mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    placed = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    state, metrics = train_step(state, placed)
    return jax.device_get(state), {k: float(v) for k, v in metrics.items()}


def _batch():
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 32, 40, 3)).astype(np.float32) * 50,
             "label": rng.integers(0, 7, (4, 32, 40)).astype(np.uint8)}
    batch["label"][:, :4] = 255
    return batch


def test_one_and_four_devices_agree():
    assert jax.device_count() >= 4, "tests/conftest.py should provide 4 CPU devices"
    batch = _batch()
    state1, metrics1 = _one_step(jax.devices()[:1], batch)
    state4, metrics4 = _one_step(jax.devices()[:4], batch)
    for key in ("loss", "main", "aux"):
        np.testing.assert_allclose(metrics4[key], metrics1[key], rtol=1e-5)
    # BatchNorm statistics are those of the global batch on both meshes.
    for a, b in zip(jax.tree.leaves(state1.batch_stats), jax.tree.leaves(state4.batch_stats)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_state_and_loss():
    batch = _batch()
    state32, metrics32 = _one_step(jax.devices()[:4], batch)
    state16, metrics16 = _one_step(jax.devices()[:4], batch, dtype=state_lib.compute_dtype("bfloat16"))
    floats = [x for x in jax.tree.leaves(state16.opt_state) if np.issubdtype(x.dtype, np.floating)]
    assert floats and all(x.dtype == np.float32 for x in floats + jax.tree.leaves(state16.params))
    # The loss is taken in float32 from bfloat16 logits: close to the float32 network's, not equal.
    assert metrics16["loss"] != metrics32["loss"]
    np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=2e-2)
    np.testing.assert_allclose(metrics16["grad_norm"], metrics32["grad_norm"], rtol=5e-2)
