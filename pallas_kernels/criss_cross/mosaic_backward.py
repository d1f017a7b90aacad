"""Backward Mosaic GPU (Hopper) kernel: one CTA per strip, one kernel per direction.

A CTA owns a whole strip (one row or column of one image, at most 128
pixels): one or two compute warpgroups, each owning 64 of its queries and
the same 64 of its keys, and a producer warpgroup that streams the strip's
value and output-gradient tiles by TMA. With the final lse of each pixel
(from the forward's merged output), each compute warpgroup
  1. computes S = Q·Kᵀ for its queries and P = exp(S - lse) once, and puts P
     in shared memory, so that both warpgroups see every query's row;
  2. for each 64-channel tile of V and dO: accumulates dP += dO·Vᵀ for its
     queries, and writes dV = Pᵀ·dO for its keys at once (all queries of the
     strip are in the CTA, so nothing is left to sum elsewhere);
  3. takes dS = P ⊙ (dP - delta) into shared memory (over P) and writes
     dQ = dS·K for its queries and dK = dSᵀ·Q for its keys.
delta = sum_c dO·O of each query is either given, or (the first direction's
pass) summed in step 2 from tiles of the output streamed beside dO's, and
written out for the other direction: an output that needs no padding then
crosses HBM once, where a separate XLA reduction would read dO and O once
more each.
No partial sums in global memory and no atomics: the result is bitwise
deterministic. The second direction's pass takes the first's dQ, dK, dV as
`previous`, adds them in its epilogues and writes the sums over them (in
place).
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
    launch,
    smem_transforms,
    tile_buffer,
    tma_and_tiles,
)
from pallas_kernels.criss_cross.mosaic_tiles import (
    ROWS,
    STAGES,
    exp_of_difference,
    live_mask,
    load_strip_tiles,
    per_query,
    release_slot,
    scores,
    stream_channel_tiles,
)
from pallas_kernels.criss_cross.mosaic_work import walk_images

# dP of a 64-query block over the whole strip stays in registers, the strip's P in shared memory.
MAX_BACKWARD_STRIP = 128
MAX_BACKWARD_QK_CHUNKS = 2  # the dQ and dK tiles are staged in the two free channel rings


def strip_backward_mosaic(
    strips: MosaicStrips,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array | None,
    *,
    interpret: bool,
    out: jax.Array | None = None,
    previous: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    images_last_first: bool = False,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
    """One direction's gradients over NHWC arrays.

    Args:
      q, k: (B, H, W, Cqp); v, dout: (B, H, W, Cvp); 16-bit, padded by
        `mosaic_layout.pad_map` as for the forward.
      lse, delta: (B, num_strips, stats_length) float32, this direction's
        strips: the merged log-sum-exp and sum_c dO·O of each pixel. With
        delta None, the kernel sums it from `out`.
      out: (B, H, W, Cvp), the op's output padded like v; only with delta None.
      previous: the other direction's (dq, dk, dv), added in the epilogues
        and overwritten with the sums (in place; not to be used after).
      images_last_first: the CTAs take the images from the last
        (mosaic_work.walk_images).

    Returns:
      ((dq, dk, dv) padded like the inputs, in their dtype (pixels past the
      valid ones unwritten, or as `previous` left them), delta as given or
      as summed here).
    """
    if strips.keys > MAX_BACKWARD_STRIP:
        raise ValueError(f"strip_backward_mosaic: strips of {strips.length} pixels exceed {MAX_BACKWARD_STRIP}")
    n_wg = strips.query_warpgroups
    keys = strips.keys
    dtype = v.dtype
    q_chunks = q.shape[-1] // CHANNEL_TILE
    if q_chunks > MAX_BACKWARD_QK_CHUNKS:
        raise ValueError(f"strip_backward_mosaic: {q.shape[-1]} query/key channels exceed "
                         f"{MAX_BACKWARD_QK_CHUNKS * CHANNEL_TILE}")
    v_tiles = v.shape[-1] // CHANNEL_TILE
    if (delta is None) == (out is None):
        raise ValueError("strip_backward_mosaic: give either delta or out (to sum delta from), not both or neither")
    sums_delta = delta is None

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_or_out_ref, *refs, q_smem, k_smem, v_smem, do_smem, p_smem,
             dv_smem, stats_smem, qk_bar, tile_bar, tile_free, stats_bar, sync=None, grad_bar=None, dv_prev_smem=None,
             dv_prev_bar=None, o_smem=None):
        # The gradient refs hold the other direction's gradients, if any, until this one's are added in.
        dq_ref, dk_ref, dv_ref = refs[:3]
        if sums_delta:
            o_ref, delta_out_ref = delta_or_out_ref, refs[3]
            o_tma, o_smem = tma_and_tiles(o_smem, strips.row_tma)
        else:
            delta_ref = delta_or_out_ref
        b, s = walk_images(lax.axis_index("b"), strips.batch, images_last_first), lax.axis_index("s")
        wg = lax.axis_index("wg")
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        v_tma, v_smem = tma_and_tiles(v_smem, strips.row_tma)
        do_tma, do_smem = tma_and_tiles(do_smem, strips.row_tma)
        dv_tma, dv_smem = tma_and_tiles(dv_smem, strips.row_tma)
        if previous is not None:
            dv_prev_tma, dv_prev_smem = tma_and_tiles(dv_prev_smem, strips.row_tma)

        def rendezvous():
            if n_wg > 1:
                plgpu.barrier_arrive(sync)
                plgpu.barrier_wait(sync)

        def grad_staging(chunk: int, which: int, rows):
            # After the channel loop the value and dO rings are free: they stage dQ (which 0) and
            # dK (which 1) tiles, a warpgroup's in its own 64 rows of slot `chunk`: (TMA's view,
            # the registers' view).
            return (v_tma, do_tma)[which].at[chunk, rows], (v_smem, do_smem)[which].at[chunk, rows]

        @pl.when(wg < n_wg)
        def _compute():
            if n_wg == 2:
                plgpu.set_max_registers(232, action="increase")
            base = wg * QUERY_BLOCK
            own = box(base, QUERY_BLOCK)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, s, own], stats_smem.at[0, wg], stats_bar.at[wg])
            if not sums_delta:
                plgpu.copy_gmem_to_smem(delta_ref.at[b, s, own], stats_smem.at[1, wg], stats_bar.at[wg])
            plgpu.barrier_wait(stats_bar.at[wg])
            lse = plgpu.load(stats_smem.at[0, wg], layout=ROWS)
            plgpu.barrier_wait(qk_bar.at[0])
            sc = scores([q_smem.at[c, own] for c in range(q_chunks)], [k_smem.at[c] for c in range(q_chunks)],
                        QUERY_BLOCK, keys)
            live = live_mask(strips, base, sc.shape)
            p = jnp.where(live, exp_of_difference(sc, per_query(lse, sc.shape)), 0.0)
            p_smem.at[own][...] = p.astype(dtype)
            plgpu.commit_smem()
            rendezvous()  # every query's P is in shared memory

            def channel_loop(dp_acc):
                delta_sum = None
                for t in range(v_tiles):
                    slot = t % STAGES
                    plgpu.barrier_wait(tile_bar.at[slot])
                    plgpu.wgmma(dp_acc, do_smem.at[slot, own], v_smem.at[slot].transpose((1, 0)))

                    def dv_tile(acc, slot=slot):
                        plgpu.wgmma(acc, p_smem.at[:, own].transpose((1, 0)), do_smem.at[slot])
                        part = None
                        if sums_delta:  # this tile's channels of sum_c dO·O, while both products run
                            do_t = plgpu.load(do_smem.at[slot, own], layout=plgpu.Layout.WGMMA)
                            o_t = plgpu.load(o_smem.at[slot, own], layout=plgpu.Layout.WGMMA)
                            part = (do_t.astype(jnp.float32) * o_t.astype(jnp.float32)).sum(axis=1)
                        return acc[...], part  # reading the accumulator waits for both products

                    dv, part = pl.run_scoped(dv_tile, plgpu.ACC((QUERY_BLOCK, CHANNEL_TILE), jnp.float32))
                    if sums_delta:
                        delta_sum = part if delta_sum is None else delta_sum + part
                    if previous is not None:
                        plgpu.barrier_wait(dv_prev_bar.at[slot * n_wg + wg])
                        dv = dv + dv_prev_smem.at[slot, wg][...].astype(jnp.float32)
                    release_slot(tile_free, t, v_tiles, read_by_thread=sums_delta or previous is not None)
                    if t >= 1:  # the previous tile's store has read the staging buffer
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    dv_smem.at[wg][...] = dv.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        dv_tma.at[wg], strips.view(dv_ref, b, s, own, box(t * CHANNEL_TILE, CHANNEL_TILE))
                    )
                return dp_acc[...], delta_sum

            dp, delta = pl.run_scoped(channel_loop, plgpu.ACC((QUERY_BLOCK, keys), jnp.float32))
            if sums_delta:
                stats_smem.at[1, wg][...] = delta
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stats_smem.at[1, wg], delta_out_ref.at[b, s, own])
            else:
                delta = plgpu.load(stats_smem.at[1, wg], layout=ROWS)
            rendezvous()  # every warpgroup's dV products have read P
            # dS = P ⊙ (dP - delta) over P, 64 keys at a time: P comes back from shared memory a
            # slice at a time rather than staying in registers beside dP through the channel loop
            # (at 128 keys that spilled in the column pass).
            delta_tile = per_query(delta, (QUERY_BLOCK, QUERY_BLOCK))
            for j in range(keys // QUERY_BLOCK):
                tile = p_smem.at[own, pl.ds(j * QUERY_BLOCK, QUERY_BLOCK)]
                p_j = plgpu.load(tile, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                tile[...] = (p_j * (dp[:, j * QUERY_BLOCK:(j + 1) * QUERY_BLOCK] - delta_tile)).astype(dtype)
            plgpu.commit_smem()
            rendezvous()  # every query's dS is in shared memory

            outputs = []
            for c in range(q_chunks):
                channels = box(c * CHANNEL_TILE, CHANNEL_TILE)
                for which, (a_tile, b_tile, out_ref) in enumerate((
                    (p_smem.at[own], k_smem.at[c], dq_ref),  # dQ = dS·K, this warpgroup's queries
                    (p_smem.at[:, own].transpose((1, 0)), q_smem.at[c], dk_ref),  # dK = dSᵀ·Q, its keys
                )):
                    staging_tma, staging = grad_staging(c, which, own)
                    if previous is not None:
                        plgpu.copy_gmem_to_smem(strips.view(out_ref, b, s, own, channels), staging_tma,
                                                grad_bar.at[wg])
                    outputs.append((a_tile, b_tile, out_ref, staging_tma, staging, channels))
            if previous is not None:
                plgpu.barrier_wait(grad_bar.at[wg])
            for a_tile, b_tile, out_ref, staging_tma, staging, channels in outputs:

                def grad(acc, a_tile=a_tile, b_tile=b_tile):
                    plgpu.wgmma(acc, a_tile, b_tile)
                    return acc[...]

                g = pl.run_scoped(grad, plgpu.ACC((QUERY_BLOCK, CHANNEL_TILE), jnp.float32))
                if previous is not None:
                    g = g + staging[...].astype(jnp.float32)
                staging[...] = g.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(staging_tma, strips.view(out_ref, b, s, own, channels))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == n_wg)
        def _produce():
            if n_wg == 2:
                plgpu.set_max_registers(40, action="decrease")
            load_strip_tiles(strips, b, s, [(q_ref, q_tma), (k_ref, k_tma)], q_chunks, qk_bar.at[0])
            rings = [(v_ref, v_tma), (do_ref, do_tma)] + ([(o_ref, o_tma)] if sums_delta else [])
            stream_channel_tiles(
                strips, b, s, num_tiles=v_tiles, rings=rings, ring_full=tile_bar,
                ring_free=tile_free, per_warpgroup=None if previous is None else (
                    dv_ref, dv_prev_tma, dv_prev_bar, [w * QUERY_BLOCK for w in range(n_wg)]),
            )

    row_tma = strips.row_tma
    scratch = dict(
        q_smem=tile_buffer((q_chunks, keys, CHANNEL_TILE), dtype, row_tma),
        k_smem=tile_buffer((q_chunks, keys, CHANNEL_TILE), dtype, row_tma),
        v_smem=tile_buffer((STAGES, keys, CHANNEL_TILE), dtype, row_tma),
        do_smem=tile_buffer((STAGES, keys, CHANNEL_TILE), dtype, row_tma),
        p_smem=plgpu.SMEM((keys, keys), dtype, transforms=smem_transforms()),
        dv_smem=tile_buffer((n_wg, QUERY_BLOCK, CHANNEL_TILE), dtype, row_tma),
        stats_smem=plgpu.SMEM((2, n_wg, QUERY_BLOCK), jnp.float32),
        qk_bar=plgpu.Barrier(num_arrivals=2 * q_chunks, num_barriers=1),
        tile_bar=plgpu.Barrier(num_arrivals=3 if sums_delta else 2, num_barriers=STAGES),
        tile_free=plgpu.Barrier(num_arrivals=n_wg, num_barriers=STAGES),
        stats_bar=plgpu.Barrier(num_arrivals=1 if sums_delta else 2, num_barriers=n_wg),
    )
    if sums_delta:
        scratch["o_smem"] = tile_buffer((STAGES, keys, CHANNEL_TILE), dtype, row_tma)
    if n_wg > 1:
        scratch["sync"] = plgpu.Barrier(num_arrivals=n_wg)
    if previous is not None:
        scratch.update(
            dv_prev_smem=tile_buffer((STAGES, n_wg, QUERY_BLOCK, CHANNEL_TILE), dtype, row_tma),
            dv_prev_bar=plgpu.Barrier(num_barriers=STAGES * n_wg),
            grad_bar=plgpu.Barrier(num_arrivals=2 * q_chunks, num_barriers=n_wg),
        )
    operands = (q, k, v, dout, lse, out if sums_delta else delta)
    out_type = [] if previous is not None else [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    if sums_delta:
        out_type.append(jax.ShapeDtypeStruct(lse.shape, jnp.float32))
    results = launch(
        body, operands, out_type, in_place=previous or (),
        scratch_types=scratch,
        grid=(strips.batch, strips.num_strips),
        grid_names=("b", "s"),
        num_threads=n_wg + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name=f"criss_cross_mosaic_bwd_{strips.direction}",
    )
    return results[:3], results[3] if sums_delta else delta
