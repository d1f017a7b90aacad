"""A forward pass with the batch sharded over 4 CPU devices equals the single-device one.

tests/conftest.py gives the process 4 host devices (XLA_FLAGS, set before jax starts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ccnet_jax import numpy_reference as ref
from ccnet_jax.models import CCNet, CCNetConfig


def forward(model, x):
    """Jitted forward of an NNX model; returns the outputs and the updated BN statistics."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        module = nnx.merge(graphdef, state)
        outputs = module(x)
        return outputs, nnx.state(module, nnx.BatchStat)

    return run(state, x)


@pytest.mark.parametrize("train", [True, False])
def test_sharded_forward_equals_single_device(train):
    if jax.device_count() < 4:
        pytest.fail(
            f"needs 4 devices, found {jax.device_count()}: run under tests/conftest.py, or set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts."
        )
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    config = CCNetConfig(
        num_classes=ref.TINY_CLASSES, width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS, implementation="xla", dropout=0.0
    )
    single = CCNet(config=config, rngs=nnx.Rngs(0))
    # The CCA op runs under shard_map over 'data' here, as the Pallas kernel needs.
    sharded = CCNet(config=config, mesh=mesh, rngs=nnx.Rngs(0))
    for model in (single, sharded):
        model.head.cca.gamma.set_value(jnp.asarray(0.5))
        model.train() if train else model.eval()
    x = np.random.default_rng(0).normal(size=(4, 39, 31, 3)).astype(np.float32)

    (main_1, aux_1), stats_1 = forward(single, jnp.asarray(x))
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    (main_4, aux_4), stats_4 = forward(sharded, x_sharded)

    assert main_4.sharding.spec[0] == "data" and len(main_4.devices()) == 4
    np.testing.assert_allclose(main_4, main_1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_4, aux_1, rtol=1e-5, atol=1e-5)
    # Train mode: the BN statistics are those of the global batch (synchronised BN).
    for a, b in zip(jax.tree.leaves(stats_4), jax.tree.leaves(stats_1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
