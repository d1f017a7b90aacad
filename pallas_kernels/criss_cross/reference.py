"""Plain jnp criss-cross attention: the "xla" implementation and the reference.

Layout NHWC. For pixel (i, j) the softmax runs over the H + W energies of its
column (the pixel itself excluded) and its row; the output aggregates v with
those weights. No 1/sqrt(d) scaling (as in the authors' code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, not -inf: exp(MASK_VALUE - m) underflows to 0, and a fully masked
# strip (H == 1) never produces NaN. The kernels use the same value.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_reference_inputs(where: str, q: jax.Array, k: jax.Array, v: jax.Array | None = None) -> None:
    """A ValueError naming the input unless q, k (and v) are float NHWC arrays of matching shapes:
    an integer input would give an integer result, truncated, and a shape mismatch einsum's
    message about a label."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if jnp.ndim(x) != 4:
            raise ValueError(f"{where}: {name} must be NHWC of rank 4 (B, H, W, C); got shape {jnp.shape(x)}.")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{where}: {name} has dtype {jnp.result_type(x)}; cast it to a float type.")
    if jnp.shape(q) != jnp.shape(k):
        raise ValueError(f"{where}: q and k must have the same shape (B, H, W, Cqk); got q {jnp.shape(q)} and "
                         f"k {jnp.shape(k)}.")
    if v is not None and jnp.shape(v)[:3] != jnp.shape(q)[:3]:
        raise ValueError(f"{where}: v must share q's (B, H, W); got q {jnp.shape(q)} and v {jnp.shape(v)}.")


def criss_cross_energies(q: jax.Array, k: jax.Array, *, precision=jax.lax.Precision.HIGHEST
                         ) -> tuple[jax.Array, jax.Array]:
    """Column and row energies in float32.

    Args:
      q, k: (B, H, W, C).
      precision: of the products (a jax.lax.Precision or DotAlgorithmPreset).
    Returns:
      e_col (B, H, W, H) with the h == i entry set to MASK_VALUE, and
      e_row (B, H, W, W).
    """
    q32 = q.astype(jnp.float32)
    k32 = k.astype(jnp.float32)
    e_col = jnp.einsum("bijc,bhjc->bijh", q32, k32, precision=precision)
    e_row = jnp.einsum("bijc,biwc->bijw", q32, k32, precision=precision)
    h = q.shape[1]
    # The pixel itself, by comparing iotas (plain StableHLO when exported; no -inf either).
    itself = jax.lax.broadcasted_iota(jnp.int32, (h, h), 0) == jax.lax.broadcasted_iota(jnp.int32, (h, h), 1)
    e_col = jnp.where(itself[None, :, None, :], MASK_VALUE, e_col)
    return e_col, e_row


def criss_cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                    precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """Criss-cross attention in jnp (float32 arithmetic), differentiable by autodiff.

    Args:
      q, k: (B, H, W, Cqk); v: (B, H, W, Cv). Any float dtype.
      precision: of its four products and their gradients' (a jax.lax.Precision
        or DotAlgorithmPreset). HIGHEST, the "xla" implementation's, is exact
        float32 on GPUs (XLA would otherwise multiply float32 in TF32 there).
    Returns:
      (B, H, W, Cv) in v's dtype: the aggregated attention, before gamma and
      the residual.
    """
    check_reference_inputs("criss_cross_attention_reference", q, k, v)
    h = q.shape[1]
    e_col, e_row = criss_cross_energies(q, k, precision=precision)
    attention = jax.nn.softmax(jnp.concatenate([e_col, e_row], axis=-1), axis=-1)
    a_col, a_row = attention[..., :h], attention[..., h:]
    v32 = v.astype(jnp.float32)
    out = jnp.einsum("bijh,bhjc->bijc", a_col, v32, precision=precision)
    out = out + jnp.einsum("bijw,biwc->bijc", a_row, v32, precision=precision)
    return out.astype(v.dtype)


def criss_cross_attention_map(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention weights of every pixel, split into its column and row parts.

    q, k: (B, H, W, Cqk), any float dtype. Returns a_col (B, H, W, H) and
    a_row (B, H, W, W), float32; for pixel
    (i, j), a_col[..., h] weighs pixel (h, j) and a_row[..., w] pixel (i, w).
    """
    check_reference_inputs("criss_cross_attention_map", q, k)
    h = q.shape[1]
    e_col, e_row = criss_cross_energies(q, k)
    attention = jax.nn.softmax(jnp.concatenate([e_col, e_row], axis=-1), axis=-1)
    return attention[..., :h], attention[..., h:]
