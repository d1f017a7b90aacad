"""Backward Pallas kernels of criss-cross attention, one direction at a time.

With the merged output O, its cotangent dO, the merged lse and
delta = sum_c dO·O, each strip contributes, for P = exp(S - lse):
    dV += Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP - delta),
    dQ += dS K,    dK += dSᵀ Q.
Two kernels per direction, neither of which ever writes an energy:
  * dv:  grid (B, strip, key block, Cv tile); recomputes P per query block
         and accumulates Pᵀ dO for its key block and Cv tile.
  * dkq: grid (B, strip, key block); accumulates dK for its key block and
         writes dQ's contribution from that key block, so dP, the costly
         O(L²·Cv) product, is computed once. When one key block holds the
         whole strip, that contribution is the strip's dQ, written at once;
         otherwise it is a partial sum (one (B, H, W, Cqk) float32 slice per
         key block, summed after by XLA).
The second direction's kernels add the first direction's dV and dK (and dQ,
when they write it) in their epilogue and write the final dtype, over the
first direction's arrays where the dtypes agree (in place); the first
direction's dQ stays float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.criss_cross.config import CrissCrossConfig
from pallas_kernels.criss_cross.strips import (
    StripGeometry,
    channel_blocks,
    channel_tile,
    live_scores,
    positions,
    written_over,
)
from pallas_kernels.criss_cross.tile_products import TileProducts, tile_products


def _probabilities(q_ref, k, lse_ref, q_pos, k_pos, qk_channels, rows, *, length, mask_diagonal,
                   products: TileProducts):
    """Q block (prepared for `products`), and P = exp(S - lse) of one (query block, key block) pair,
    zero where masked; `k` is prepared."""
    q_valid = q_pos < length
    q = products.operand(plgpu.load(q_ref.at[rows, :], mask=q_valid[:, None] & qk_channels[None, :], other=0.0))
    lse = plgpu.load(lse_ref.at[rows], mask=q_valid, other=0.0)
    s = products.dot(q, k, trans_b=True)
    live = live_scores(q_pos, k_pos, length, mask_diagonal)
    return q, jnp.where(live, jnp.exp(s - lse[:, None]), 0.0)


def _dv_kernel(
    q_ref, k_ref, lse_ref, do_ref, *refs,
    length: int, cqk: int, cv: int, block_q: int, block_k: int, block_cv: int,
    num_q_blocks: int, num_cv: int, cv_last_first: bool, mask_diagonal: bool, accumulate: bool,
    products: TileProducts,
):
    if accumulate:
        dv_prev_ref, dv_ref = refs
    else:
        (dv_ref,) = refs
    k_pos = positions(pl.program_id(2), block_k)
    k_valid = k_pos < length
    cv_valid = positions(channel_tile(pl.program_id(3), num_cv, cv_last_first), block_cv) < cv
    qk_channels = jnp.arange(q_ref.shape[-1]) < cqk
    k = products.operand(plgpu.load(k_ref, mask=k_valid[:, None] & qk_channels[None, :], other=0.0))

    def body(qb, acc):
        q_pos = positions(qb, block_q)
        rows = pl.ds(qb * block_q, block_q)
        _, p = _probabilities(
            q_ref, k, lse_ref, q_pos, k_pos, qk_channels, rows,
            length=length, mask_diagonal=mask_diagonal, products=products,
        )
        do = plgpu.load(do_ref.at[rows, :], mask=(q_pos < length)[:, None] & cv_valid[None, :], other=0.0)
        p = products.operand(p, dtype=do.dtype, unit_interval=True)
        return acc + products.dot(p, products.operand(do), trans_a=True)

    acc = jax.lax.fori_loop(0, num_q_blocks, body, jnp.zeros((block_k, block_cv), jnp.float32))
    out_mask = k_valid[:, None] & cv_valid[None, :]
    if accumulate:
        acc = acc + plgpu.load(dv_prev_ref, mask=out_mask, other=0.0)
    plgpu.store(dv_ref, acc.astype(dv_ref.dtype), mask=out_mask)


def _dkq_kernel(
    q_ref, k_ref, v_ref, lse_ref, delta_ref, do_ref, *refs,
    length: int, cqk: int, cv: int, block_q: int, block_k: int, block_cv: int,
    num_q_blocks: int, num_cv_blocks: int, mask_diagonal: bool, accumulate: bool, whole_strip: bool,
    products: TileProducts,
):
    # whole_strip: this CTA's key block is the strip, so each query block's dQ is complete here.
    dq_prev_ref = None
    if accumulate and whole_strip:
        dk_prev_ref, dq_prev_ref, dk_ref, dq_ref = refs
    elif accumulate:
        dk_prev_ref, dk_ref, dq_ref = refs
    else:
        dk_ref, dq_ref = refs
    k_pos = positions(pl.program_id(2), block_k)
    k_valid = k_pos < length
    qk_channels = jnp.arange(q_ref.shape[-1]) < cqk
    k_mask = k_valid[:, None] & qk_channels[None, :]
    k = plgpu.load(k_ref, mask=k_mask, other=0.0)
    k_operand = products.operand(k)

    def body(qb, dk):
        q_pos = positions(qb, block_q)
        q_valid = q_pos < length
        rows = pl.ds(qb * block_q, block_q)
        q, p = _probabilities(
            q_ref, k_operand, lse_ref, q_pos, k_pos, qk_channels, rows,
            length=length, mask_diagonal=mask_diagonal, products=products,
        )
        delta = plgpu.load(delta_ref.at[rows], mask=q_valid, other=0.0)

        def cv_tile(c, dp):
            cv_pos = positions(c, block_cv)
            cols = pl.ds(c * block_cv, block_cv)
            cv_valid = cv_pos < cv
            do = plgpu.load(do_ref.at[rows, cols], mask=q_valid[:, None] & cv_valid[None, :], other=0.0)
            v = plgpu.load(v_ref.at[:, cols], mask=k_valid[:, None] & cv_valid[None, :], other=0.0)
            return dp + products.dot(products.operand(do), products.operand(v), trans_b=True)

        dp = jax.lax.fori_loop(0, num_cv_blocks, cv_tile, jnp.zeros((block_q, block_k), jnp.float32))
        ds = products.operand(p * (dp - delta[:, None]), dtype=k.dtype)
        dq_mask = q_valid[:, None] & qk_channels[None, :]
        dq = products.dot(ds, k_operand)
        if dq_prev_ref is not None:
            dq = dq + plgpu.load(dq_prev_ref.at[rows, :], mask=dq_mask, other=0.0)
        plgpu.store(dq_ref.at[rows, :], dq.astype(dq_ref.dtype), mask=dq_mask)
        return dk + products.dot(ds, q, trans_a=True)

    dk = jax.lax.fori_loop(0, num_q_blocks, body, jnp.zeros((block_k, k_ref.shape[-1]), jnp.float32))
    if accumulate:
        dk = dk + plgpu.load(dk_prev_ref, mask=k_mask, other=0.0)
    plgpu.store(dk_ref, dk.astype(dk_ref.dtype), mask=k_mask)


def _compiler_params(config: CrissCrossConfig):
    return plgpu.CompilerParams(num_warps=config.bwd_num_warps, num_stages=config.bwd_num_stages)


def strip_backward_dv(
    geometry: StripGeometry,
    q: jax.Array,
    k: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    config: CrissCrossConfig,
    interpret: bool,
    previous: jax.Array | None = None,
    out_dtype=jnp.float32,
    cv_last_first: bool = False,
) -> jax.Array:
    """This direction's dV (B, H, W, Cv) in out_dtype, plus `previous` when given (written over it
    where its dtype is out_dtype: not to be used after); with `cv_last_first` the Cv tiles are
    taken from the last (`channel_tile`)."""
    batch, _, _, cqk = q.shape
    cv = do.shape[-1]
    cqk_p, block_cv, num_cv = channel_blocks(cqk, cv, config.block_cv)
    block_q, block_k = config.block_q, config.block_k
    num_q = geometry.num_blocks(block_q)
    strip_len = geometry.padded_length(block_q)
    grid = (batch, geometry.num_strips, geometry.num_blocks(block_k), num_cv)

    def tile(c):
        return channel_tile(c, num_cv, cv_last_first)

    out_spec = geometry.pixels(block_k, block_cv, lambda b, s, t, c: (b, s, t, tile(c)))
    in_specs = [
        geometry.pixels(strip_len, cqk_p, lambda b, s, t, c: (b, s, 0, 0)),
        geometry.pixels(block_k, cqk_p, lambda b, s, t, c: (b, s, t, 0)),
        geometry.scalars(strip_len, lambda b, s, t, c: (b, s, 0)),
        geometry.pixels(strip_len, block_cv, lambda b, s, t, c: (b, s, 0, tile(c))),
    ]
    operands = [q, k, lse, do]
    if previous is not None:
        in_specs.append(out_spec)
        operands.append(previous)
    kernel = functools.partial(
        _dv_kernel,
        length=geometry.length, cqk=cqk, cv=cv, block_q=block_q, block_k=block_k,
        block_cv=block_cv, num_q_blocks=num_q, num_cv=num_cv, cv_last_first=cv_last_first,
        mask_diagonal=geometry.mask_diagonal, accumulate=previous is not None,
        products=tile_products(q.dtype, config, interpret),
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(do.shape, out_dtype),
        input_output_aliases=written_over(previous, out_dtype, operand=4),
        interpret=interpret,
        name=f"criss_cross_bwd_dv_{geometry.direction}",
        compiler_params=_compiler_params(config),
    )(*operands)


def strip_backward_dkq(
    geometry: StripGeometry,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    do: jax.Array,
    config: CrissCrossConfig,
    interpret: bool,
    previous: tuple[jax.Array, jax.Array] | None = None,
    out_dtype=jnp.float32,
    dq_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """This direction's dK (B, H, W, Cqk) in out_dtype and dQ in dq_dtype, plus `previous` (dK, dQ)
    when given, each written over its previous where their dtypes agree (not to be used after).
    (dQ is small, C/8 channels: a first direction keeps it in float32.)

    When `config.dkq_key_block` holds the whole strip, the kernel writes dQ itself;
    otherwise it writes one float32 partial sum per key block, which XLA adds up.
    """
    batch, _, _, cqk = q.shape
    cv = v.shape[-1]
    cqk_p, block_cv, num_cv = channel_blocks(cqk, cv, config.bwd_block_cv)
    cv_p = num_cv * block_cv
    block_q, block_k = config.block_q, config.dkq_key_block
    num_q = geometry.num_blocks(block_q)
    num_k = geometry.num_blocks(block_k)
    whole_strip = num_k == 1
    strip_len = geometry.padded_length(block_q)
    grid = (batch, geometry.num_strips, num_k)
    dk_spec = geometry.pixels(block_k, cqk_p, lambda b, s, t: (b, s, t, 0))
    strip_spec = geometry.pixels(strip_len, cqk_p, lambda b, s, t: (b, s, 0, 0))
    in_specs = [
        strip_spec,
        dk_spec,
        geometry.pixels(block_k, cv_p, lambda b, s, t: (b, s, t, 0)),
        geometry.scalars(strip_len, lambda b, s, t: (b, s, 0)),
        geometry.scalars(strip_len, lambda b, s, t: (b, s, 0)),
        geometry.pixels(strip_len, cv_p, lambda b, s, t: (b, s, 0, 0)),
    ]
    operands = [q, k, v, lse, delta, do]
    if previous is not None:
        in_specs.append(dk_spec)
        operands.append(previous[0])
        if whole_strip:
            in_specs.append(strip_spec)
            operands.append(previous[1])
    if whole_strip:
        dq_spec, dq_shape = strip_spec, jax.ShapeDtypeStruct(q.shape, dq_dtype)
    else:
        dq_spec = geometry.partials(strip_len, cqk_p, lambda b, s, t: (t, b, s))
        dq_shape = jax.ShapeDtypeStruct((num_k, *q.shape), jnp.float32)
    kernel = functools.partial(
        _dkq_kernel,
        length=geometry.length, cqk=cqk, cv=cv, block_q=block_q, block_k=block_k,
        block_cv=block_cv, num_q_blocks=num_q, num_cv_blocks=num_cv,
        mask_diagonal=geometry.mask_diagonal, accumulate=previous is not None, whole_strip=whole_strip,
        products=tile_products(q.dtype, config, interpret),
    )
    aliases = {}
    if previous is not None:
        aliases = written_over(previous[0], out_dtype, operand=6)
        if whole_strip:
            aliases |= written_over(previous[1], dq_dtype, operand=7, output=1)
    dk, dq = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[dk_spec, dq_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, out_dtype), dq_shape],
        input_output_aliases=aliases,
        interpret=interpret,
        name=f"criss_cross_bwd_dkq_{geometry.direction}",
        compiler_params=_compiler_params(config),
    )(*operands)
    if not whole_strip:
        dq = jnp.sum(dq, axis=0)
        if previous is not None:
            dq = dq + previous[1].astype(jnp.float32)
        dq = dq.astype(dq_dtype)
    return dk, dq
