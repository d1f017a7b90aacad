"""Forward Pallas kernel: flash-style attention inside each row, then each column.

Pass 1 (rows) writes each pixel's row-normalised output o_row (in the input dtype for
16-bit inputs, else float32) and
its log-sum-exp lse_row. Pass 2 (columns, the pixel itself masked) computes
the column part and merges both exactly in its epilogue:
    lse = logaddexp(lse_row, lse_col)
    out = exp(lse_row - lse) * o_row + exp(lse_col - lse) * o_col
so the B·H·W·(H+W) energies only ever exist as register tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.criss_cross.config import CrissCrossConfig
from pallas_kernels.criss_cross.reference import MASK_VALUE
from pallas_kernels.criss_cross.strips import (
    StripGeometry,
    channel_blocks,
    channel_tile,
    live_scores,
    positions,
    written_over,
)
from pallas_kernels.criss_cross.tile_products import TileProducts, tile_products


def _forward_kernel(
    q_ref, k_ref, v_ref, *refs,
    length: int, cqk: int, cv: int, block_q: int, block_k: int, block_cv: int,
    num_k_blocks: int, num_cv: int, cv_last_first: bool, mask_diagonal: bool, combine: bool,
    products: TileProducts,
):
    if combine:
        o_prev_ref, lse_prev_ref, out_ref, lse_ref = refs
    else:
        out_ref, lse_ref = refs
    q_pos = positions(pl.program_id(2), block_q)
    q_valid = q_pos < length
    cv_valid = positions(channel_tile(pl.program_id(3), num_cv, cv_last_first), block_cv) < cv
    qk_channels = jnp.arange(q_ref.shape[-1]) < cqk
    q = products.operand(plgpu.load(q_ref, mask=q_valid[:, None] & qk_channels[None, :], other=0.0))

    def body(kb, carry):
        m, denominator, acc = carry
        k_pos = positions(kb, block_k)
        k_valid = k_pos < length
        rows = pl.ds(kb * block_k, block_k)
        k = plgpu.load(k_ref.at[rows, :], mask=k_valid[:, None] & qk_channels[None, :], other=0.0)
        s = products.dot(q, products.operand(k), trans_b=True)
        s = jnp.where(live_scores(q_pos, k_pos, length, mask_diagonal), s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        denominator = denominator * alpha + jnp.sum(p, axis=1)
        v = plgpu.load(v_ref.at[rows, :], mask=k_valid[:, None] & cv_valid[None, :], other=0.0)
        p = products.operand(p, dtype=v.dtype, unit_interval=True)
        acc = acc * alpha[:, None] + products.dot(p, products.operand(v))
        return m_new, denominator, acc

    init = (
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.zeros((block_q, block_cv), jnp.float32),
    )
    m, denominator, acc = jax.lax.fori_loop(0, num_k_blocks, body, init)
    lse = m + jnp.log(denominator)
    o = acc / denominator[:, None]
    out_mask = q_valid[:, None] & cv_valid[None, :]
    if combine:
        o_prev = plgpu.load(o_prev_ref, mask=out_mask, other=0.0)
        lse_prev = plgpu.load(lse_prev_ref, mask=q_valid, other=0.0)
        top = jnp.maximum(lse_prev, lse)
        merged = top + jnp.log(jnp.exp(lse_prev - top) + jnp.exp(lse - top))
        o = jnp.exp(lse_prev - merged)[:, None] * o_prev + jnp.exp(lse - merged)[:, None] * o
        lse = merged
    plgpu.store(out_ref, o.astype(out_ref.dtype), mask=out_mask)
    plgpu.store(lse_ref, lse, mask=q_valid)


def strip_forward(
    geometry: StripGeometry,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: CrissCrossConfig,
    interpret: bool,
    previous: tuple[jax.Array, jax.Array] | None = None,
    out_dtype=jnp.float32,
    cv_last_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention inside every strip of one direction.

    Args:
      geometry: which direction (rows or columns) and the map's sizes.
      q, k: (B, H, W, Cqk); v: (B, H, W, Cv).
      previous: the other direction's (o (B, H, W, Cv), lse (B, H, W) float32)
        to merge with; None for the first pass. o is overwritten with the
        result where its dtype is out_dtype (in place: not to be used after).
      cv_last_first: take the Cv tiles from the last (`channel_tile`).
    Returns:
      (o (B, H, W, Cv) in out_dtype, lse (B, H, W) float32). Without
      `previous`, o is normalised within this direction's strips only.
    """
    batch, _, _, cqk = q.shape
    cv = v.shape[-1]
    cqk_p, block_cv, num_cv = channel_blocks(cqk, cv, config.block_cv)
    block_q = config.block_q
    block_k = config.block_k
    num_k = geometry.num_blocks(block_k)
    strip_len = geometry.padded_length(block_k)
    grid = (batch, geometry.num_strips, geometry.num_blocks(block_q), num_cv)

    def tile(c):
        return channel_tile(c, num_cv, cv_last_first)

    in_specs = [
        geometry.pixels(block_q, cqk_p, lambda b, s, t, c: (b, s, t, 0)),
        geometry.pixels(strip_len, cqk_p, lambda b, s, t, c: (b, s, 0, 0)),
        geometry.pixels(strip_len, block_cv, lambda b, s, t, c: (b, s, 0, tile(c))),
    ]
    out_spec = geometry.pixels(block_q, block_cv, lambda b, s, t, c: (b, s, t, tile(c)))
    lse_spec = geometry.scalars(block_q, lambda b, s, t, c: (b, s, t))
    operands = [q, k, v]
    if previous is not None:
        in_specs += [out_spec, lse_spec]
        operands += list(previous)

    kernel = functools.partial(
        _forward_kernel,
        length=geometry.length, cqk=cqk, cv=cv, block_q=block_q, block_k=block_k,
        block_cv=block_cv, num_k_blocks=num_k, num_cv=num_cv, cv_last_first=cv_last_first,
        mask_diagonal=geometry.mask_diagonal,
        combine=previous is not None, products=tile_products(q.dtype, config, interpret),
    )
    # The row result's buffer takes the merged one. Not lse's: with several Cv blocks, each
    # program writes its query block's merged lse, which another may not have read yet.
    aliases = written_over(None if previous is None else previous[0], out_dtype, operand=3)
    out_shape = [
        jax.ShapeDtypeStruct(v.shape, out_dtype),
        jax.ShapeDtypeStruct(q.shape[:3], jnp.float32),
    ]
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[out_spec, lse_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name=f"criss_cross_fwd_{geometry.direction}",
        compiler_params=plgpu.CompilerParams(
            num_warps=config.fwd_num_warps, num_stages=config.fwd_num_stages
        ),
    )(*operands)
