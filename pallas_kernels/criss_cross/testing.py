"""Checking a criss-cross attention implementation: a float64 numpy reference, inputs, tolerances.

The reference is dense and written independently of the kernels: every pixel
attends over all H·W pixels of its image with a mask that keeps exactly its
row and its column minus itself (counted once, via the row). Forward and the
analytic backward of softmax attention, in float64, from the definition of
criss-cross attention (the paper's). The tests and `experiments/attention_check.py`
compare every implementation against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.criss_cross.config import CrissCrossConfig

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


def criss_cross_mask(h: int, w: int) -> np.ndarray:
    """(H·W, H·W) bool: pixel n = i·W + j attends to m iff same row, or same column and m != n."""
    rows = np.repeat(np.arange(h), w)
    cols = np.tile(np.arange(w), h)
    same_row = rows[:, None] == rows[None, :]
    same_col = cols[:, None] == cols[None, :]
    return same_row | (same_col & ~np.eye(h * w, dtype=bool))


def _flat(x):
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _attention(q, k):
    b, h, w, _ = q.shape
    qf, kf = _flat(q), _flat(k)
    energies = np.einsum("bnc,bmc->bnm", qf, kf)
    mask = criss_cross_mask(h, w)[None]
    energies = np.where(mask, energies, -np.inf)
    energies -= energies.max(axis=-1, keepdims=True)
    weights = np.exp(energies)
    return weights / weights.sum(axis=-1, keepdims=True)


def dense_forward(q, k, v) -> np.ndarray:
    """(B, H, W, Cv) float64 output for NHWC q, k (Cqk) and v (Cv)."""
    a = _attention(q, k)
    out = np.einsum("bnm,bmc->bnc", a, _flat(v))
    return out.reshape(*np.shape(v))


def dense_vjp(q, k, v, dout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dq, dk, dv) float64 for the cotangent dout (B, H, W, Cv)."""
    a = _attention(q, k)
    qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat(dout)
    dv = np.einsum("bnm,bnc->bmc", a, gf)
    da = np.einsum("bnc,bmc->bnm", gf, vf)
    de = a * (da - np.sum(da * a, axis=-1, keepdims=True))
    dq = np.einsum("bnm,bmc->bnc", de, kf)
    dk = np.einsum("bnm,bnc->bmc", de, qf)
    return dq.reshape(np.shape(q)), dk.reshape(np.shape(k)), dv.reshape(np.shape(v))
