"""Float64 numpy criss-cross attention, written independently of the op.

Dense formulation: every pixel attends over all H·W pixels of its image with
a mask that keeps exactly its row and its column minus itself (counted once,
via the row). Forward and the analytic backward of softmax attention, in
float64, from the definition of criss-cross attention (the paper's).
"""

from __future__ import annotations

import numpy as np


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


def forward(q, k, v) -> np.ndarray:
    """(B, H, W, Cv) float64 output for NHWC q, k (Cqk) and v (Cv)."""
    a = _attention(q, k)
    out = np.einsum("bnm,bmc->bnc", a, _flat(v))
    return out.reshape(*np.shape(v))


def vjp(q, k, v, dout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dq, dk, dv) float64 for the cotangent dout (B, H, W, Cv)."""
    a = _attention(q, k)
    qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat(dout)
    dv = np.einsum("bnm,bnc->bmc", a, gf)
    da = np.einsum("bnc,bmc->bnm", gf, vf)
    de = a * (da - np.sum(da * a, axis=-1, keepdims=True))
    dq = np.einsum("bnm,bmc->bnc", de, kf)
    dk = np.einsum("bnm,bnc->bmc", de, qf)
    return dq.reshape(np.shape(q)), dk.reshape(np.shape(k)), dv.reshape(np.shape(v))
