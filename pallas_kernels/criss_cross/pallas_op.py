"""The Pallas criss-cross attention op: forward and backward kernels under custom_vjp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.criss_cross.config import CrissCrossConfig
from pallas_kernels.criss_cross.pallas_backward import (
    strip_backward_dkq,
    strip_backward_dv,
)
from pallas_kernels.criss_cross.pallas_forward import strip_forward
from pallas_kernels.criss_cross.residuals import name_residuals
from pallas_kernels.criss_cross.strips import StripGeometry


def _geometries(q: jax.Array) -> tuple[StripGeometry, StripGeometry]:
    b, h, w, _ = q.shape
    return StripGeometry("row", b, h, w), StripGeometry("col", b, h, w)


def intermediate_dtype(dtype):
    """dtype of the first direction's results (o_row, dV, dK), which the second pass reads back:
    the input's for 16-bit inputs (half the bytes through HBM), float32 otherwise."""
    return dtype if jnp.dtype(dtype).itemsize == 2 else jnp.float32


def _forward(q, k, v, config: CrissCrossConfig, interpret: bool):
    rows, cols = _geometries(q)
    row_part = strip_forward(rows, q, k, v, config, interpret, out_dtype=intermediate_dtype(v.dtype))
    return strip_forward(cols, q, k, v, config, interpret, previous=row_part, out_dtype=v.dtype,
                         cv_last_first=config.alternate_cv_order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def criss_cross_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, config: CrissCrossConfig, interpret: bool
) -> jax.Array:
    """Criss-cross attention through the Pallas kernels (inputs already validated).

    q, k: (B, H, W, Cqk); v: (B, H, W, Cv); returns (B, H, W, Cv) in v's dtype.
    """
    return _forward(q, k, v, config, interpret)[0]


def _vjp_forward(q, k, v, config, interpret):
    out, lse = name_residuals(*_forward(q, k, v, config, interpret))
    # O(B·H·W·(Cqk + Cv)) residuals: no energy is kept for the backward.
    return out, (q, k, v, out, lse)


def pallas_backward(q, k, v, out, lse, dout, config: CrissCrossConfig, interpret: bool):
    """(dq, dk, dv) through the Triton kernels, from the residuals of either forward.

    lse: (B, H, W) float32, the merged log-sum-exp of each pixel; dout in v's dtype.
    """
    rows, cols = _geometries(q)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dv = strip_backward_dv(rows, q, k, lse, dout, config, interpret, out_dtype=intermediate_dtype(v.dtype))
    dv = strip_backward_dv(cols, q, k, lse, dout, config, interpret, previous=dv, out_dtype=v.dtype,
                           cv_last_first=config.alternate_cv_order)
    dk, dq = strip_backward_dkq(
        rows, q, k, v, lse, delta, dout, config, interpret, out_dtype=intermediate_dtype(k.dtype)
    )
    dk, dq = strip_backward_dkq(
        cols, q, k, v, lse, delta, dout, config, interpret, previous=(dk, dq), out_dtype=k.dtype, dq_dtype=q.dtype
    )
    return dq, dk, dv


def _vjp_backward(config, interpret, residuals, dout):
    q, k, v, out, lse = residuals
    return pallas_backward(q, k, v, out, lse, dout.astype(v.dtype), config, interpret)


criss_cross_attention_pallas.defvjp(_vjp_forward, _vjp_backward)
