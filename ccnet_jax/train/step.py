"""The jitted training step over a mesh: batch sharded on the data axis, state replicated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccnet_jax.train.losses import LossConfig, segmentation_loss
from ccnet_jax.train.state import ModelParts, TrainState, replicated


class TrainStep:
    """`step(state, batch) -> (state, metrics)`, one jitted program; `step.lower(state, batch)`
    gives XLA's lowering (compile it for the memory analysis, or to call it directly).

    Only the batch's "image" and "label" enter the program, so a batch may carry
    other keys (file names) without changing what is compiled.
    """

    def __init__(self, jitted: Callable):
        self._jitted = jitted

    @staticmethod
    def program_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"image": batch["image"], "label": batch["label"]}

    def __call__(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._jitted(state, self.program_inputs(batch))

    def lower(self, state: TrainState, batch: dict[str, jax.Array]):
        return self._jitted.lower(state, self.program_inputs(batch))


def dropout_key(state: TrainState) -> jax.Array:
    """The dropout key of the step about to run: a function of (base key, step) only."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def loss_and_updates(
    parts: ModelParts, state: TrainState, batch: dict[str, jax.Array], loss_config: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """Forward and backward on one global batch: (loss, parts, grads, new batch_stats)."""
    key = dropout_key(state)

    def loss_fn(params):
        model = parts.model(params, state.batch_stats, train=True, dropout_key=key)
        main, aux = model(batch["image"])
        loss, terms = segmentation_loss(main, aux, batch["label"], loss_config)
        return loss, (terms, nnx.state(model, nnx.BatchStat))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, terms, grads, batch_stats


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    loss_config: LossConfig,
    mesh: Mesh,
    data_axis: str = "data",
) -> TrainStep:
    """`step(state, batch) -> (state, metrics)`, jitted, the input state donated.

    batch: {"image": float32 (B, H, W, 3), "label": uint8 (B, H, W)}, global
    arrays sharded over `data_axis`. Because the whole step is one program over
    the global batch, BatchNorm statistics, the OHEM threshold and the loss
    mean are taken over all devices (synchronised BN without extra code).
    metrics: float32 scalars loss, main, aux, grad_norm.
    """

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, terms, grads, batch_stats = loss_and_updates(parts, state, batch, loss_config)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads).astype(jnp.float32)}
        return new_state, metrics

    data = NamedSharding(mesh, PartitionSpec(data_axis))
    repl = replicated(mesh)
    return TrainStep(
        jax.jit(step, in_shardings=(repl, {"image": data, "label": data}), out_shardings=(repl, repl), donate_argnums=0)
    )


def make_mesh(data_axis: str = "data", devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or `devices`), named `data_axis`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (data_axis,))
