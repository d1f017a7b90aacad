"""The training state: a pytree of replicated arrays, and the model pieces that stay static.

`TrainState` holds everything a step changes and a checkpoint saves: the step
counter, the parameters (`nnx.Param`), the BatchNorm statistics
(`nnx.BatchStat`), the optax state and the base RNG key (raw uint32 key data,
so orbax stores it as an ordinary array). Dropout keys are derived from
(rng, step) inside the step (and the micro-batch, with train.accumulate_steps), so resuming
with the same accumulate_steps replays exactly the same masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ccnet_jax.models import CCNet, CCNetConfig
from ccnet_jax.models.parts import ModelParts, replicated, split_model


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of nnx.Param, float32
    batch_stats: Any  # nnx.State of nnx.BatchStat
    opt_state: Any  # optax state over params
    rng: jax.Array  # uint32 key data of the base key


def compute_dtype(name: str) -> jnp.dtype | None:
    """"float32" -> None (the parameters' dtype), "bfloat16" -> jnp.bfloat16; else a ValueError."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return jnp.bfloat16
    raise ValueError(f"compute dtype {name!r} is not 'float32' or 'bfloat16'")


def build_model(
    config: CCNetConfig, *, seed: int, mesh: Mesh | None = None, dtype: jnp.dtype | None = None
) -> CCNet:
    """A freshly initialised CCNet (same weights on every host for the same seed)."""
    return CCNet(config=config, rngs=nnx.Rngs(seed), mesh=mesh, dtype=dtype)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` as a global array replicated over `mesh` (all hosts pass equal values)."""
    sharding = replicated(mesh)

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def step0_state(model: CCNet, tx: optax.GradientTransformation, *, seed: int) -> tuple[ModelParts, TrainState]:
    """The step-0 state of `model` under `tx`, on the default device (see `init_state`)."""
    parts, params, batch_stats = split_model(model)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=rng,
    )
    return parts, state


def init_state(
    model: CCNet, tx: optax.GradientTransformation, *, seed: int, mesh: Mesh
) -> tuple[ModelParts, TrainState]:
    """The step-0 state of `model` under `tx`, replicated over `mesh`."""
    parts, state = step0_state(model, tx, seed=seed)
    return parts, replicate(state, mesh)
