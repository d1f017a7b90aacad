"""A CCNet split for jitted functions: static graph definitions (train and eval mode) and its arrays.

Jitted training and evaluation take the arrays (parameters, BatchNorm
statistics) as arguments and rebuild the module inside the trace from the
static parts; `replicated` is the sharding those arrays have over a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccnet_jax.models.ccnet import CCNet


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
