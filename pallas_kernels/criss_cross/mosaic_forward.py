"""Forward Mosaic GPU (Hopper) kernel: exact softmax over a whole strip, per direction.

A CTA owns 64 or 128 queries of one strip (one row or one column of one
image): one or two compute warpgroups of 64 queries each, and a producer
warpgroup that streams the strip's keys and value tiles by TMA. Each
compute warpgroup
  1. computes S = Q·Kᵀ over every key of the strip with wgmma (the strip's
     keys fit: at most 256),
  2. masks padded keys (and, in the column pass, the pixel itself), and takes
     the exact log-sum-exp of its rows,
  3. writes P = exp(S - lse) in the input dtype to shared memory once, and
  4. for each 64-channel tile of V: O = P·V with wgmma, stored by TMA.
Intermediates stay in the input dtype; there is no online-softmax rescaling.
With `value_splits` > 1, that many CTAs share the strip's queries, each with
its share of the value tiles (steps 1-3 repeated by each): more CTAs where a
small batch leaves SMs idle.

The row pass writes o_row (normalised within the row) and lse_row. The column
pass takes them as `previous` and merges exactly in its epilogue:
    lse = logaddexp(lse_row, lse_col)
    out = exp(lse_row - lse) * o_row + exp(S - lse)·V
(the second term is its own P·V with P = exp(S - lse) taken against the
merged lse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.criss_cross.mosaic_layout import (
    CHANNEL_TILE,
    QUERY_BLOCK,
    MosaicStrips,
    box,
    interpret_params,
    smem_transforms,
    tile_buffer,
    tma_and_tiles,
)
from pallas_kernels.criss_cross.mosaic_tiles import (
    ROWS,
    STAGES,
    live_mask,
    load_own_tiles,
    load_strip_tiles,
    log_add_exp,
    per_query,
    release_slot,
    scores,
    stream_channel_tiles,
    warpgroups_that_fit,
)
from pallas_kernels.criss_cross.reference import MASK_VALUE


def forward_scratch(n_wg: int, keys: int, q_chunks: int, stages: int, dtype, with_previous: bool,
                    row_tma: bool = False) -> dict:
    """The forward kernel's shared memory and barriers, by name."""
    tile_shape = (QUERY_BLOCK, CHANNEL_TILE)
    scratch = dict(
        q_smem=tile_buffer((n_wg, q_chunks, *tile_shape), dtype, row_tma),
        k_smem=tile_buffer((q_chunks, keys, CHANNEL_TILE), dtype, row_tma),
        v_smem=tile_buffer((stages, keys, CHANNEL_TILE), dtype, row_tma),
        p_smem=plgpu.SMEM((n_wg, QUERY_BLOCK, keys), dtype, transforms=smem_transforms()),
        o_smem=tile_buffer((n_wg, 2, *tile_shape), dtype, row_tma),
        lse_smem=plgpu.SMEM((n_wg, QUERY_BLOCK), jnp.float32),
        q_bar=plgpu.Barrier(num_arrivals=q_chunks, num_barriers=n_wg),
        k_bar=plgpu.Barrier(num_arrivals=q_chunks, num_barriers=1),
        v_bar=plgpu.Barrier(num_barriers=stages),
        v_free=plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages),
    )
    if with_previous:
        scratch.update(
            prev_smem=tile_buffer((stages, n_wg, *tile_shape), dtype, row_tma),
            lse_prev_smem=plgpu.SMEM((n_wg, QUERY_BLOCK), jnp.float32),
            prev_bar=plgpu.Barrier(num_barriers=stages * n_wg),
            lse_prev_bar=plgpu.Barrier(num_barriers=n_wg),
        )
    return scratch


def forward_warpgroups(keys: int, q_channels: int, stages: int, dtype, wanted: int) -> int:
    """Query warpgroups per CTA, at most `wanted`, whose forward (the column pass, which also
    holds the row result's tiles) fits in shared memory; 0 if not even one does."""
    q_chunks = q_channels // CHANNEL_TILE
    return warpgroups_that_fit(lambda n_wg: forward_scratch(n_wg, keys, q_chunks, stages, dtype, with_previous=True),
                               min(wanted, keys // QUERY_BLOCK))


def strip_forward_mosaic(
    strips: MosaicStrips,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    interpret: bool,
    stages: int = STAGES,
    value_splits: int = 1,
    previous: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One direction's pass over NHWC inputs, with `stages` value tiles in flight and the value
    tiles shared among `value_splits` CTAs (which must divide their count).

    Args:
      q, k: (B, H, W, Cqp) and v: (B, H, W, Cvp), 16-bit, channels padded
        by `mosaic_layout.pad_map` to multiples of 64 (H and W too, to
        multiples of 8, unless `strips.row_tma` or interpreting).
      previous: for the column pass, (o_row (B, H, W, Cvp) in v's dtype,
        lse_row (B, W, stats_length) float32, i.e. indexed by this pass's
        strips).

    Returns:
      out: (B, H, W, Cvp) in v's dtype (rows or columns past the valid ones
        unwritten); lse: (B, num_strips, stats_length) float32.
    """
    n_wg = strips.query_warpgroups
    keys = strips.keys
    dtype = v.dtype
    q_chunks = q.shape[-1] // CHANNEL_TILE
    if (v.shape[-1] // CHANNEL_TILE) % value_splits:
        raise ValueError(f"strip_forward_mosaic: {value_splits} value splits do not divide "
                         f"{v.shape[-1] // CHANNEL_TILE} value tiles")
    v_tiles = v.shape[-1] // CHANNEL_TILE // value_splits  # per CTA
    queries_per_cta = QUERY_BLOCK * n_wg
    tile_shape = (QUERY_BLOCK, CHANNEL_TILE)

    def body(q_ref, k_ref, v_ref, *refs, q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bar, v_bar,
             v_free, prev_smem=None, lse_prev_smem=None, prev_bar=None, lse_prev_bar=None):
        if previous is None:
            out_ref, lse_ref = refs
        else:
            o_prev_ref, lse_prev_ref, out_ref, lse_ref = refs
        b, s, block = lax.axis_index("b"), lax.axis_index("s"), lax.axis_index("q")
        wg = lax.axis_index("wg")
        split = lax.axis_index("c")
        first_tile = split * v_tiles
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        v_tma, v_smem = tma_and_tiles(v_smem, strips.row_tma)
        o_tma, o_smem = tma_and_tiles(o_smem, strips.row_tma)
        if previous is not None:
            prev_tma, prev_smem = tma_and_tiles(prev_smem, strips.row_tma)

        def query_base(w):
            return block * queries_per_cta + w * QUERY_BLOCK

        @pl.when(wg < n_wg)
        def _compute():
            if n_wg == 2:
                plgpu.set_max_registers(232, action="increase")
            qb = query_base(wg)
            own = box(qb, QUERY_BLOCK)
            load_own_tiles(strips, q_ref, b, s, own, [q_tma.at[wg, c] for c in range(q_chunks)], q_bar.at[wg])
            if previous is not None:
                plgpu.copy_gmem_to_smem(lse_prev_ref.at[b, s, own], lse_prev_smem.at[wg], lse_prev_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(k_bar.at[0])
            sc = scores([q_smem.at[wg, c] for c in range(q_chunks)], [k_smem.at[c] for c in range(q_chunks)],
                        QUERY_BLOCK, keys)
            sc = jnp.where(live_mask(strips, qb, sc.shape), sc, MASK_VALUE)
            m = sc.max(axis=1)
            lse = m + jnp.log(jnp.exp(sc - per_query(m, sc.shape)).sum(axis=1))
            if previous is not None:
                plgpu.barrier_wait(lse_prev_bar.at[wg])
                lse_prev = plgpu.load(lse_prev_smem.at[wg], layout=ROWS)
                lse = log_add_exp(lse_prev, lse)
                prev_weight = per_query(jnp.exp(lse_prev - lse), tile_shape)
            p_smem.at[wg][...] = jnp.exp(sc - per_query(lse, sc.shape)).astype(dtype)
            lse_smem.at[wg][...] = lse
            plgpu.commit_smem()

            @pl.when(split == 0)  # every split has the same lse
            def _():
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, s, own])
            for t in range(v_tiles):
                slot = t % stages
                plgpu.barrier_wait(v_bar.at[slot])

                def pv(acc, slot=slot):
                    plgpu.wgmma(acc, p_smem.at[wg], v_smem.at[slot])
                    return acc[...]

                o = pl.run_scoped(pv, plgpu.ACC(tile_shape, jnp.float32))
                if previous is not None:
                    plgpu.barrier_wait(prev_bar.at[slot * n_wg + wg])
                    o = o + prev_weight * prev_smem.at[slot, wg][...].astype(jnp.float32)
                release_slot(v_free, t, v_tiles, read_by_thread=previous is not None, stages=stages)
                if t >= 2:  # the store issued two tiles ago has read this staging buffer
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                o_smem.at[wg, t % 2][...] = o.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_tma.at[wg, t % 2], strips.view(
                    out_ref, b, s, own, box((first_tile + t) * CHANNEL_TILE, CHANNEL_TILE)))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == n_wg)
        def _produce():
            if n_wg == 2:
                plgpu.set_max_registers(40, action="decrease")
            load_strip_tiles(strips, b, s, [(k_ref, k_tma)], q_chunks, k_bar.at[0])
            stream_channel_tiles(
                strips, b, s, num_tiles=v_tiles, rings=[(v_ref, v_tma)], ring_full=v_bar, ring_free=v_free,
                per_warpgroup=None if previous is None else (
                    o_prev_ref, prev_tma, prev_bar, [query_base(w) for w in range(n_wg)]),
                first_tile=first_tile,
            )

    scratch = forward_scratch(n_wg, keys, q_chunks, stages, dtype, previous is not None, strips.row_tma)
    lse_shape = (strips.batch, strips.num_strips, strips.stats_length)
    operands = (q, k, v) if previous is None else (q, k, v, *previous)
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(v.shape, dtype), jax.ShapeDtypeStruct(lse_shape, jnp.float32)),
        scratch_types=scratch,
        grid=(strips.batch, strips.num_strips, strips.query_blocks, value_splits),
        grid_names=("b", "s", "q", "c"),
        num_threads=n_wg + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name=f"criss_cross_mosaic_fwd_{strips.direction}",
    )(*operands)
