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

from ccnet_jax.train.losses import LossConfig, micro_batch_weights, segmentation_loss
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
    parts: ModelParts, params: Any, batch_stats: Any, key: jax.Array, batch: dict[str, jax.Array],
    loss_config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """Forward and backward on one batch: (loss, its terms, grads, new batch_stats)."""

    def loss_fn(params):
        model = parts.model(params, batch_stats, train=True, dropout_key=key)
        main, aux = model(batch["image"])
        loss, terms = segmentation_loss(main, aux, batch["label"], loss_config)
        return loss, (terms, nnx.state(model, nnx.BatchStat))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, terms, grads, batch_stats


def micro_batches(x: jax.Array, count: int) -> jax.Array:
    """(B, ...) -> (count, B / count, ...): micro-batch i holds images i, i + count, i + 2 count, ...

    A batch sharded over devices in contiguous blocks whose size `count` divides keeps each
    device's images on it in every micro-batch: the split moves no data between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)


def accumulated_loss_and_updates(
    parts: ModelParts, state: TrainState, batch: dict[str, jax.Array], loss_config: LossConfig, count: int,
    micro_sharding: NamedSharding | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """`loss_and_updates` over the global batch in `count` micro-batches (`micro_batches`), one
    after another: the loss, its terms and the gradients are the micro-batches' sums weighted by
    `micro_batch_weights`, so the loss is the whole batch's. BatchNorm normalises each micro-batch
    by its own statistics (where that differs from one batch) and updates the running ones after
    each (as `count` forward passes would), and micro-batch i drops out with the step's key folded
    with i. Only one micro-batch's activations are alive at a time. count == 1 is the plain step."""
    key = dropout_key(state)
    if count == 1:
        return loss_and_updates(parts, state.params, state.batch_stats, key, batch, loss_config)
    micro = {name: micro_batches(x, count) for name, x in batch.items()}
    if micro_sharding is not None:
        micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

    def one(batch_stats, index, micro_batch):
        return loss_and_updates(parts, state.params, batch_stats, jax.random.fold_in(key, index), micro_batch,
                                loss_config)

    def body(carry, inputs):
        sums, batch_stats = carry
        index, weight, micro_batch = inputs
        loss, terms, grads, batch_stats = one(batch_stats, index, micro_batch)
        sums = jax.tree.map(lambda total, x: total + weight * x, sums, (loss, terms, grads))
        return (sums, batch_stats), None

    first = {name: x[0] for name, x in micro.items()}
    shapes = jax.eval_shape(one, state.batch_stats, 0, first)[:3]
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
    weights = micro_batch_weights(micro["label"], loss_config)
    (sums, batch_stats), _ = jax.lax.scan(body, (zeros, state.batch_stats), (jnp.arange(count), weights, micro))
    loss, terms, grads = sums
    return loss, terms, grads, batch_stats


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    loss_config: LossConfig,
    mesh: Mesh,
    data_axis: str = "data",
    accumulate_steps: int = 1,
) -> TrainStep:
    """`step(state, batch) -> (state, metrics)`, jitted, the input state donated.

    batch: {"image": float32 (B, H, W, 3), "label": uint8 (B, H, W)}, global
    arrays sharded over `data_axis`. Because the whole step is one program over
    the global batch, BatchNorm statistics, the OHEM threshold and the loss
    mean are taken over all devices (synchronised BN without extra code).
    With accumulate_steps = k > 1 the batch is taken as k micro-batches of B / k
    images (`accumulated_loss_and_updates`), each still over all devices, for
    one optimizer update: B / k must divide over the devices (and into OHEM's
    groups). metrics: float32 scalars loss, main, aux, grad_norm.
    """
    if not isinstance(accumulate_steps, int) or accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be an integer >= 1, not {accumulate_steps!r}")
    data = NamedSharding(mesh, PartitionSpec(data_axis))
    repl = replicated(mesh)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, data_axis))

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        images = batch["image"].shape[0]
        if images % (accumulate_steps * mesh.devices.size):
            raise ValueError(f"a batch of {images} images does not split into {accumulate_steps} micro-batches "
                             f"that divide over {mesh.devices.size} devices; use a batch that is a multiple of "
                             f"{accumulate_steps * mesh.devices.size}")
        loss, terms, grads, batch_stats = accumulated_loss_and_updates(parts, state, batch, loss_config,
                                                                       accumulate_steps, micro_sharding)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads).astype(jnp.float32)}
        return new_state, metrics

    return TrainStep(
        jax.jit(step, in_shardings=(repl, {"image": data, "label": data}), out_shardings=(repl, repl), donate_argnums=0)
    )


def make_mesh(data_axis: str = "data", devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or `devices`), named `data_axis`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (data_axis,))
