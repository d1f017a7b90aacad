"""Shared inputs and tolerances for the criss-cross attention tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import CrissCrossConfig

# Blocks of 16 make the small test maps span several query, key and Cv blocks.
SMALL_BLOCKS = CrissCrossConfig(block_q=16, block_k=16, block_cv=16, bwd_block_cv=16)

_F32_EPS = float(jnp.finfo(jnp.float32).eps)


def tolerance(dtype, reduction_length: int) -> float:
    """Bound on ||x - ref|| / ||ref|| against the float64 reference.

    Two ulps of the input/output dtype (inputs are rounded to it before the
    reference sees them, outputs and the kernels' P and dS tiles are rounded
    to it), plus float32 accumulation error growing as the square root of
    the longest reduction.
    """
    eps = float(jnp.finfo(dtype).eps)
    return 2 * eps + 8 * _F32_EPS * float(np.sqrt(reduction_length))


def relative_error(x, reference) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def random_inputs(seed: int, b: int, h: int, w: int, cqk: int, cv: int, dtype):
    """q, k, v and a cotangent g, standard normal, rounded to dtype."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, h, w, cqk)).astype(dtype)
    k = jax.random.normal(keys[1], (b, h, w, cqk)).astype(dtype)
    v = jax.random.normal(keys[2], (b, h, w, cv)).astype(dtype)
    g = jax.random.normal(keys[3], (b, h, w, cv)).astype(dtype)
    return q, k, v, g


def op_kwargs(implementation: str) -> dict:
    if implementation == "triton":
        return {"implementation": "triton", "interpret": True, "config": SMALL_BLOCKS}
    return {"implementation": implementation}
