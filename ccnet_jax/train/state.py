"""The training state: a pytree of replicated arrays, and the model pieces that stay static.

`TrainState` holds everything a step changes and a checkpoint saves: the step
counter, the parameters (`nnx.Param`), the BatchNorm statistics
(`nnx.BatchStat`), the optax state and the base RNG key (raw uint32 key data,
so orbax stores it as an ordinary array). Dropout keys are derived from
(rng, step) inside the step, so resuming replays exactly the same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccnet_jax.models import CCNet, CCNetConfig


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of nnx.Param, float32
    batch_stats: Any  # nnx.State of nnx.BatchStat
    opt_state: Any  # optax state over params
    rng: jax.Array  # uint32 key data of the base key


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The static halves of a split CCNet: graph definitions (train and eval mode) and RNG variables."""

    train_graph: Any
    eval_graph: Any
    rng_state: Any  # the dropout streams' nnx state; reseeded every step

    def model(self, params: Any, batch_stats: Any, *, train: bool, dropout_key: jax.Array | None = None) -> CCNet:
        """A CCNet carrying these arrays (fresh Variables, so it can be built inside any trace)."""
        graph = self.train_graph if train else self.eval_graph
        model = nnx.merge(graph, params, batch_stats, self.rng_state, copy=True)
        if dropout_key is not None:
            nnx.reseed(model, default=dropout_key)
        return model


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


def split_model(model: CCNet) -> tuple[ModelParts, Any, Any]:
    """(static parts, params, batch_stats) of `model`; its train/eval mode is left as it was."""
    was_training = model.head.dropout.deterministic is False
    model.train()
    train_graph, params, batch_stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
    if was_training:
        model.train()
    return ModelParts(train_graph, eval_graph, rng_state), params, batch_stats


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` as a global array replicated over `mesh` (all hosts pass equal values)."""
    sharding = replicated(mesh)

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def init_state(
    model: CCNet, tx: optax.GradientTransformation, *, seed: int, mesh: Mesh
) -> tuple[ModelParts, TrainState]:
    """The step-0 state of `model` under `tx`, replicated over `mesh`."""
    parts, params, batch_stats = split_model(model)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=rng,
    )
    return parts, replicate(state, mesh)
