"""Backward Mosaic GPU (Hopper) kernels for strips of 129 to 256 pixels: a query side, a key side.

The one-CTA backward (mosaic_backward.py) keeps a 64-query warpgroup's dP
over the whole strip in registers and the strip's whole P in shared memory.
At 256 keys dP alone takes 128 registers a thread, and P (128 KiB) with the
channel rings exceeds the 227 KiB of shared memory. So a
longer strip runs two kernels per direction:

  query side: a CTA owns 64 or 128 queries of a strip (a compute warpgroup
    per 64). It puts P = exp(S - lse) in shared memory, accumulates
    dP += dO·Vᵀ over the 64-channel tiles of V and of its queries' dO, takes
    dS = P ⊙ (dP - delta), writes dS to global memory (input dtype,
    (B, strips, keys, key-side stats_length): the key side's 64-key column
    blocks stay inside each row) and dQ = dS·K.
  key side: a CTA owns 64 or 128 keys of a strip. It recomputes P for its
    keys against every query of the strip (one Cqk-deep product per 64
    queries), reads dS for its keys, writes dK = dSᵀ·Q and, for each
    64-channel tile of dO, dV = Pᵀ·dO.

Each gradient is complete where it is written (no partial sums, no atomics:
bitwise deterministic); dS costs one write and one read of 2·keys² bytes a
strip. The second direction's pass takes the first's (dq, dk, dv) as
`previous`, adds them in its epilogues and writes the sums over them (in
place).
"""

from __future__ import annotations

import dataclasses

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
    load_own_tiles,
    load_strip_tiles,
    per_query,
    release_slot,
    scores,
    stream_channel_tiles,
    warpgroups_that_fit,
)
from pallas_kernels.criss_cross.mosaic_work import walk_images

TILE = (QUERY_BLOCK, CHANNEL_TILE)


def query_side_scratch(n_wg: int, keys: int, q_chunks: int, dtype, with_previous: bool,
                       row_tma: bool = False) -> dict:
    """The query-side kernel's shared memory and barriers, by name."""
    scratch = dict(
        q_smem=tile_buffer((n_wg, q_chunks, *TILE), dtype, row_tma),
        k_smem=tile_buffer((q_chunks, keys, CHANNEL_TILE), dtype, row_tma),
        v_smem=tile_buffer((STAGES, keys, CHANNEL_TILE), dtype, row_tma),
        # Each warpgroup's dO tiles; after the channel loop they stage its dQ tiles.
        do_smem=tile_buffer((STAGES, n_wg, *TILE), dtype, row_tma),
        p_smem=plgpu.SMEM((n_wg, QUERY_BLOCK, keys), dtype, transforms=smem_transforms()),
        stats_smem=plgpu.SMEM((2, n_wg, QUERY_BLOCK), jnp.float32),
        own_bar=plgpu.Barrier(num_arrivals=q_chunks + 2, num_barriers=n_wg),
        k_bar=plgpu.Barrier(num_arrivals=q_chunks, num_barriers=1),
        v_bar=plgpu.Barrier(num_barriers=STAGES),
        do_bar=plgpu.Barrier(num_barriers=STAGES * n_wg),
        tile_free=plgpu.Barrier(num_arrivals=n_wg, num_barriers=STAGES),
    )
    if with_previous:
        scratch["dq_prev_bar"] = plgpu.Barrier(num_arrivals=q_chunks, num_barriers=n_wg)
    return scratch


def key_side_scratch(n_wg: int, keys: int, q_chunks: int, dtype, with_previous: bool,
                     row_tma: bool = False) -> dict:
    """The key-side kernel's shared memory and barriers, by name."""
    scratch = dict(
        q_smem=tile_buffer((q_chunks, keys, CHANNEL_TILE), dtype, row_tma),
        # Each warpgroup's keys; once P is taken they stage its dK tiles.
        k_smem=tile_buffer((n_wg, q_chunks, *TILE), dtype, row_tma),
        do_smem=tile_buffer((STAGES, keys, CHANNEL_TILE), dtype, row_tma),
        # dS[:, own keys]; once dK is written, its first 128 rows stage the dV tiles.
        ds_smem=tile_buffer((n_wg, keys, CHANNEL_TILE), dtype, row_tma),
        pt_smem=plgpu.SMEM((n_wg, keys, CHANNEL_TILE), dtype, transforms=smem_transforms()),
        lse_smem=plgpu.SMEM((keys,), jnp.float32),
        strip_bar=plgpu.Barrier(num_arrivals=q_chunks + 1, num_barriers=1),
        own_bar=plgpu.Barrier(num_arrivals=q_chunks + 1, num_barriers=n_wg),
        do_bar=plgpu.Barrier(num_barriers=STAGES),
        tile_free=plgpu.Barrier(num_arrivals=n_wg, num_barriers=STAGES),
    )
    if with_previous:
        scratch.update(
            dv_prev_smem=tile_buffer((STAGES, n_wg, *TILE), dtype, row_tma),
            dv_prev_bar=plgpu.Barrier(num_barriers=STAGES * n_wg),
            dk_prev_bar=plgpu.Barrier(num_arrivals=q_chunks, num_barriers=n_wg),
        )
    return scratch


def long_backward_warpgroups(keys: int, q_channels: int, dtype) -> tuple[int, int]:
    """(query-side, key-side) warpgroups per CTA for `keys`-key strips; a 0 means it does not fit
    (128 query/key channels at 256 keys)."""
    q_chunks = q_channels // CHANNEL_TILE
    if q_chunks > STAGES:  # the query side stages its dQ tiles in the dO ring's slots
        return 0, 0
    # Sized for the column pass, which also holds the other direction's gradient tiles.
    return tuple(warpgroups_that_fit(lambda n_wg: scratch(n_wg, keys, q_chunks, dtype, with_previous=True), 2)
                 for scratch in (query_side_scratch, key_side_scratch))


def _block_base(n_wg: int, w):
    """First query (query side) or key (key side) of warpgroup `w` of this CTA's block."""
    return lax.axis_index("blk") * (QUERY_BLOCK * n_wg) + w * QUERY_BLOCK


def _launch(body, strips: MosaicStrips, out_type, scratch: dict, operands, in_place, interpret: bool, name: str):
    """The kernel, writing over `in_place` (the other direction's gradients; see mosaic_layout.launch)
    and returning them before `out_type`'s outputs."""
    return launch(
        body, operands, out_type, in_place=in_place or (),
        scratch_types=scratch,
        grid=(strips.batch, strips.num_strips, strips.query_blocks),
        grid_names=("b", "s", "blk"),
        num_threads=strips.query_warpgroups + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name=f"criss_cross_mosaic_bwd_{name}_{strips.direction}",
    )


def _query_side(strips: MosaicStrips, q, k, v, dout, lse, delta, *, interpret: bool, dq_previous,
                ds_columns: int, last_first: bool):
    """dQ of this direction (plus `dq_previous`) and dS (B, num_strips, keys, ds_columns), its
    columns past the keys unwritten."""
    n_wg, keys, dtype = strips.query_warpgroups, strips.keys, v.dtype
    q_chunks, v_tiles = q.shape[-1] // CHANNEL_TILE, v.shape[-1] // CHANNEL_TILE

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, q_smem, k_smem, v_smem, do_smem, p_smem,
             stats_smem, own_bar, k_bar, v_bar, do_bar, tile_free, dq_prev_bar=None):
        if dq_previous is None:
            dq_ref, ds_ref = refs
        else:
            dq_prev_ref, dq_ref, ds_ref = refs
        b, s, wg = walk_images(lax.axis_index("b"), strips.batch, last_first), lax.axis_index("s"), lax.axis_index("wg")
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        v_tma, v_smem = tma_and_tiles(v_smem, strips.row_tma)
        do_tma, do_smem = tma_and_tiles(do_smem, strips.row_tma)

        @pl.when(wg < n_wg)
        def _compute():
            if n_wg == 2:
                plgpu.set_max_registers(232, action="increase")
            qb = _block_base(n_wg, wg)
            own = box(qb, QUERY_BLOCK)
            load_own_tiles(strips, q_ref, b, s, own, [q_tma.at[wg, c] for c in range(q_chunks)], own_bar.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, s, own], stats_smem.at[0, wg], own_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, s, own], stats_smem.at[1, wg], own_bar.at[wg])
            plgpu.barrier_wait(own_bar.at[wg])
            plgpu.barrier_wait(k_bar.at[0])
            sc = scores([q_smem.at[wg, c] for c in range(q_chunks)], [k_smem.at[c] for c in range(q_chunks)],
                        QUERY_BLOCK, keys)
            lse = plgpu.load(stats_smem.at[0, wg], layout=ROWS)
            p = jnp.where(live_mask(strips, qb, sc.shape), exp_of_difference(sc, per_query(lse, sc.shape)), 0.0)
            # P waits in shared memory, so that the registers hold dP alone through the channel loop.
            p_smem.at[wg][...] = p.astype(dtype)

            def channel_loop(dp_acc):
                for t in range(v_tiles):
                    slot = t % STAGES
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(do_bar.at[slot * n_wg + wg])
                    plgpu.wgmma(dp_acc, do_smem.at[slot, wg], v_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma_wait(1)  # tile t - 1's product is done: its slot may be refilled
                    if t >= 1:
                        release_slot(tile_free, t - 1, v_tiles, read_by_thread=False)
                plgpu.wgmma_wait(0)
                return dp_acc[...]

            dp = pl.run_scoped(channel_loop, plgpu.ACC((QUERY_BLOCK, keys), jnp.float32))
            delta = per_query(plgpu.load(stats_smem.at[1, wg], layout=ROWS), TILE)
            # dS = P ⊙ (dP - delta), 64 keys at a time: P comes back from shared memory a slice at
            # a time, so that it never sits in registers whole beside dP.
            for j in range(keys // QUERY_BLOCK):
                slice_keys = pl.ds(j * QUERY_BLOCK, QUERY_BLOCK)
                p = plgpu.load(p_smem.at[wg, :, slice_keys], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                dp_j = dp[:, j * QUERY_BLOCK:(j + 1) * QUERY_BLOCK]
                p_smem.at[wg, :, slice_keys][...] = (p * (dp_j - delta)).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(p_smem.at[wg], ds_ref.at[b, s, own, box(0, keys)])

            staging = [do_smem.at[c, wg] for c in range(q_chunks)]
            if dq_previous is not None:
                load_own_tiles(strips, dq_prev_ref, b, s, own, [do_tma.at[c, wg] for c in range(q_chunks)],
                               dq_prev_bar.at[wg])
                plgpu.barrier_wait(dq_prev_bar.at[wg])
            for c in range(q_chunks):

                def dq_tile(acc, c=c):
                    plgpu.wgmma(acc, p_smem.at[wg], k_smem.at[c])
                    return acc[...]

                dq = pl.run_scoped(dq_tile, plgpu.ACC(TILE, jnp.float32))
                if dq_previous is not None:
                    dq = dq + staging[c][...].astype(jnp.float32)
                staging[c][...] = dq.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(do_tma.at[c, wg],
                                        strips.view(dq_ref, b, s, own, box(c * CHANNEL_TILE, CHANNEL_TILE)))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == n_wg)
        def _produce():
            if n_wg == 2:
                plgpu.set_max_registers(40, action="decrease")
            load_strip_tiles(strips, b, s, [(k_ref, k_tma)], q_chunks, k_bar.at[0])
            stream_channel_tiles(strips, b, s, num_tiles=v_tiles, rings=[(v_ref, v_tma)], ring_full=v_bar,
                                 ring_free=tile_free,
                                 per_warpgroup=(do_ref, do_tma, do_bar, [_block_base(n_wg, w) for w in range(n_wg)]))

    scratch = query_side_scratch(n_wg, keys, q_chunks, dtype, dq_previous is not None, strips.row_tma)
    # dQ is not written over dq_previous: dS, the other output, would then need a zeroed buffer
    # (mosaic_layout.launch), a larger write than the few MB of dQ it would save.
    operands = (q, k, v, dout, lse, delta) + (() if dq_previous is None else (dq_previous,))
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((strips.batch, strips.num_strips, keys, ds_columns), dtype))
    return _launch(body, strips, out_type, scratch, operands, None, interpret, "query_side")


def _key_side(strips: MosaicStrips, q, k, dout, lse, ds, *, interpret: bool, previous, last_first: bool):
    """dK and dV of this direction (plus `previous` = (dk, dv) of the other one)."""
    n_wg, keys, dtype = strips.query_warpgroups, strips.keys, dout.dtype
    q_chunks, v_tiles = q.shape[-1] // CHANNEL_TILE, dout.shape[-1] // CHANNEL_TILE

    def body(q_ref, k_ref, do_ref, lse_ref, ds_ref, *refs, q_smem, k_smem, do_smem, ds_smem, pt_smem, lse_smem,
             strip_bar, own_bar, do_bar, tile_free, dv_prev_smem=None, dv_prev_bar=None, dk_prev_bar=None):
        dk_ref, dv_ref = refs  # hold the other direction's dK and dV, if any, until this one's are added in
        b, s, wg = walk_images(lax.axis_index("b"), strips.batch, last_first), lax.axis_index("s"), lax.axis_index("wg")
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        do_tma, do_smem = tma_and_tiles(do_smem, strips.row_tma)
        ds_tma, ds_smem = tma_and_tiles(ds_smem, strips.row_tma)
        if previous is not None:
            dv_prev_tma, dv_prev_smem = tma_and_tiles(dv_prev_smem, strips.row_tma)

        @pl.when(wg < n_wg)
        def _compute():
            kb = _block_base(n_wg, wg)
            own = box(kb, QUERY_BLOCK)
            load_own_tiles(strips, k_ref, b, s, own, [k_tma.at[wg, c] for c in range(q_chunks)], own_bar.at[wg])
            plgpu.copy_gmem_to_smem(ds_ref.at[b, s, box(0, keys), own], ds_tma.at[wg], own_bar.at[wg])
            plgpu.barrier_wait(strip_bar.at[0])
            plgpu.barrier_wait(own_bar.at[wg])
            # P[:, own keys], 64 queries at a time, against the lse of those queries.
            for j in range(keys // QUERY_BLOCK):
                queries = pl.ds(j * QUERY_BLOCK, QUERY_BLOCK)
                sc = scores([q_smem.at[c, queries] for c in range(q_chunks)],
                            [k_smem.at[wg, c] for c in range(q_chunks)], QUERY_BLOCK, QUERY_BLOCK)
                lse = plgpu.load(lse_smem.at[queries], layout=ROWS)
                live = live_mask(strips, j * QUERY_BLOCK, sc.shape, key_base=kb)
                p = jnp.where(live, exp_of_difference(sc, per_query(lse, sc.shape)), 0.0)
                pt_smem.at[wg, queries][...] = p.astype(dtype)
            plgpu.commit_smem()

            if previous is not None:  # K is read: its tiles take the other direction's dK
                load_own_tiles(strips, dk_ref, b, s, own, [k_tma.at[wg, c] for c in range(q_chunks)],
                               dk_prev_bar.at[wg])
                plgpu.barrier_wait(dk_prev_bar.at[wg])
            for c in range(q_chunks):

                def dk_tile(acc, c=c):
                    plgpu.wgmma(acc, ds_smem.at[wg].transpose((1, 0)), q_smem.at[c])
                    return acc[...]

                dk = pl.run_scoped(dk_tile, plgpu.ACC(TILE, jnp.float32))
                staging = k_smem.at[wg, c]
                if previous is not None:
                    dk = dk + staging[...].astype(jnp.float32)
                staging[...] = dk.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(k_tma.at[wg, c],
                                        strips.view(dk_ref, b, s, own, box(c * CHANNEL_TILE, CHANNEL_TILE)))

            for t in range(v_tiles):
                slot = t % STAGES
                plgpu.barrier_wait(do_bar.at[slot])

                def dv_tile(acc, slot=slot):
                    plgpu.wgmma(acc, pt_smem.at[wg].transpose((1, 0)), do_smem.at[slot])
                    return acc[...]

                dv = pl.run_scoped(dv_tile, plgpu.ACC(TILE, jnp.float32))
                if previous is not None:
                    plgpu.barrier_wait(dv_prev_bar.at[slot * n_wg + wg])
                    dv = dv + dv_prev_smem.at[slot, wg][...].astype(jnp.float32)
                release_slot(tile_free, t, v_tiles, read_by_thread=previous is not None)
                # dS is read (dK's products are done): its rows stage dV, two tiles in turn.
                rows = pl.ds((t % 2) * QUERY_BLOCK, QUERY_BLOCK)
                if t >= 2:  # the store issued two tiles ago has read this staging tile
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                ds_smem.at[wg, rows][...] = dv.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(ds_tma.at[wg, rows],
                                        strips.view(dv_ref, b, s, own, box(t * CHANNEL_TILE, CHANNEL_TILE)))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == n_wg)
        def _produce():
            load_strip_tiles(strips, b, s, [(q_ref, q_tma)], q_chunks, strip_bar.at[0])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, s, box(0, keys)], lse_smem, strip_bar.at[0])
            stream_channel_tiles(
                strips, b, s, num_tiles=v_tiles, rings=[(do_ref, do_tma)], ring_full=do_bar, ring_free=tile_free,
                per_warpgroup=None if previous is None else (
                    dv_ref, dv_prev_tma, dv_prev_bar, [_block_base(n_wg, w) for w in range(n_wg)]),
            )

    scratch = key_side_scratch(n_wg, keys, q_chunks, dtype, previous is not None, strips.row_tma)
    out_type = [] if previous is not None else [jax.ShapeDtypeStruct(k.shape, dtype),
                                                 jax.ShapeDtypeStruct(dout.shape, dtype)]
    return _launch(body, strips, out_type, scratch, (q, k, dout, lse, ds), previous, interpret, "key_side")


def strip_backward_long_mosaic(
    strips: MosaicStrips,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    interpret: bool,
    previous: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    images_last_first: tuple[bool, bool] = (False, False),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One direction's gradients over NHWC arrays, for strips of 129 to 256 pixels.

    Args as `mosaic_backward.strip_backward_mosaic`, with delta given: q, k (B, H, W, Cqp)
    and v, dout (B, H, W, Cvp), 16-bit, padded by `mosaic_layout.pad_map`; lse and delta
    (B, num_strips, stats_length) float32; `previous` the other direction's (dq, dk, dv),
    added in the epilogues and overwritten with the sums (in place); `images_last_first` for the
    query-side and the key-side kernel (mosaic_work.walk_images). Returns (dq, dk, dv) padded
    like the inputs, in their dtype.
    """
    query_wg, key_wg = long_backward_warpgroups(strips.keys, q.shape[-1], v.dtype)
    if not query_wg or not key_wg:
        raise ValueError(f"strip_backward_long_mosaic: {strips.keys}-key strips with {q.shape[-1]} query/key "
                         "channels do not fit in shared memory; the Triton backward takes them "
                         "(criss_cross_attention's Mosaic op falls back to it by itself)")
    key_strips = dataclasses.replace(strips, max_query_warpgroups=key_wg)
    dq, ds = _query_side(dataclasses.replace(strips, max_query_warpgroups=query_wg), q, k, v, dout, lse, delta,
                         interpret=interpret, dq_previous=None if previous is None else previous[0],
                         ds_columns=key_strips.stats_length, last_first=images_last_first[0])
    dk, dv = _key_side(key_strips, q, k, dout, lse, ds,
                       interpret=interpret, previous=None if previous is None else previous[1:],
                       last_first=images_last_first[1])
    return dq, dk, dv
