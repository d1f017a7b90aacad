"""Backward Mosaic GPU (Hopper) kernels for float32 inputs, on float16 pairs: a query side, a key side.

float32 q and k arrive as float16 pairs (tile_products.split_images, one
scale per image, as in the forward); v and dO arrive as float32, and the
producer warpgroup splits each of their channel tiles in shared memory, in
place, with its image's scale (mosaic_split), so that XLA neither writes nor keeps their
pairs. Every product is three wgmmas (lo·hi, hi·lo, hi·hi). Pairs take twice the shared memory of 16-bit tiles, so the
one-CTA backward (a strip's whole P beside two channel rings: about 288 KiB
at 128 keys) does not fit an H100. Each direction runs two kernels of one
compute warpgroup a CTA instead, for strips of up to 128 pixels, and each
recomputes S and dP, so that dS never crosses global memory:

  query side: a CTA owns 64 queries of a strip. It accumulates dP = dO·Vᵀ
    over the 64-channel tiles of V (strip-long) and of its queries' dO, then
    takes S = Q·Kᵀ, P = exp(S - lse) and dS = P ⊙ (dP - delta), splits dS
    with one scale per query (dQ = dS·K sums within a row) and writes dQ.
  key side: a CTA owns 64 keys and works transposed, one row per key:
    Sᵀ = K·Qᵀ against every query of the strip and Pᵀ = exp(Sᵀ - lse), with
    the queries' lse (and later delta) along the columns; Pᵀ is split into
    shared memory. For each 64-channel tile it accumulates dPᵀ += V·dOᵀ and
    writes dV = Pᵀ·dO at once; then dSᵀ = Pᵀ ⊙ (dPᵀ - delta), split with one
    scale per key (dK = dSᵀ·Q sums over the queries of a row), and dK.

Each scale is a power of two, so a split costs no precision beyond the
pair's own 2^-22. Gradients are float32 and complete where they are written
(no partial sums, no atomics: bitwise deterministic); the second direction
takes the first's as `previous`, adds them in its epilogues and writes the
sums over them (in place: no second set of float32 gradients).

Shared memory at 128 keys with 64 query/key channels, the column pass: the
query side 195 KiB (Q 16, K 32, a two-stage V ring 64, its queries' dO 32,
dS 32, dQ staging 16); the key side 211 KiB (Q 32, its K 16, a two-stage dO
ring 64, P/dS 32, dV staging 32, and one stage, 16 each, for its own V tiles
and the other direction's dV: two would take 243). A split tile takes the
bytes of its float32 tile, so splitting in the kernels costs no shared
memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.criss_cross.mosaic_forward import PAIR_PRODUCTS, output_pieces, output_tiles
from pallas_kernels.criss_cross.mosaic_layout import (
    CHANNEL_TILE,
    QUERY_BLOCK,
    MosaicStrips,
    box,
    interpret_params,
    launch,
    round_up,
    smem_transforms,
    tile_buffer,
    tma_and_tiles,
)
from pallas_kernels.criss_cross.mosaic_split import SplitRing, produce_split_tiles, split_buffers
from pallas_kernels.criss_cross.mosaic_tiles import (
    ROWS,
    STAGES,
    exp_of_difference,
    fits_shared_memory,
    live_mask,
    load_own_tiles,
    load_strip_tiles,
    per_query,
    release_slot,
    scores,
)
from pallas_kernels.criss_cross.mosaic_work import walk_images
from pallas_kernels.criss_cross.tile_products import UNIT_UNSCALE, split, split_rows

MAX_PAIRS_STRIP = 128  # a strip's Pᵀ and dPᵀ rows of 64 keys, and its Q pairs, fit one CTA
MAX_PAIRS_QK_CHUNKS = 2  # the key side stages its dK tiles in its two dV staging tiles
OWN_STAGES = 1  # the key side's own V tiles and the other direction's dV tiles in flight
COLUMNS = plgpu.Layout.WGMMA.reduce(0)  # a per-column vector of a wgmma result
TILE = (QUERY_BLOCK, CHANNEL_TILE)
PIECES = output_pieces(jnp.float32)
PIECE = CHANNEL_TILE // PIECES
F16 = jnp.float16

# Rows of each image's (UNSCALE_ROWS, 64) block of the `unscale` operand, each one constant: the
# factors that undo the maps' scales. A product takes its two operands' factors one at a time: their product alone
# could leave float32's normal range where the true result does not.
# The last two are the scales with which the producer splits V's and dO's float32 tiles.
Q_UNSCALE, K_UNSCALE, V_UNSCALE, DO_UNSCALE, V_SCALE, DO_SCALE = range(6)
UNSCALE_ROWS = 6


def pairs_unscale(q_unscale: jax.Array, k_unscale: jax.Array, v_scales: jax.Array, do_scales: jax.Array) -> jax.Array:
    """The kernels' (B, UNSCALE_ROWS, 64) float32 `unscale` operand from q's and k's unscales (B,)
    and v's and dO's (scale, unscale) (B, 2) (tile_products.split_images, mosaic_split.map_scales)."""
    rows = jnp.stack([q_unscale, k_unscale, v_scales[:, 1], do_scales[:, 1], v_scales[:, 0], do_scales[:, 0]],
                     axis=1)
    return jnp.broadcast_to(rows[:, :, None], (*rows.shape, QUERY_BLOCK)).astype(jnp.float32)


def _pair_tiles(shape: tuple[int, ...], row_tma: bool):
    return tile_buffer((2, *shape), F16, row_tma)


def query_side_scratch(keys: int, q_chunks: int, with_previous: bool, row_tma: bool = False,
                       aliased: bool = True) -> dict:
    """The query-side kernel's shared memory and barriers, by name (`aliased=False` for the
    interpreter: mosaic_split.split_buffers)."""
    scratch = dict(
        q_smem=_pair_tiles((q_chunks, *TILE), row_tma),
        k_smem=_pair_tiles((q_chunks, keys, CHANNEL_TILE), row_tma),
        v_smem=split_buffers(STAGES, keys, row_tma, aliased),
        do_smem=split_buffers(STAGES, QUERY_BLOCK, row_tma, aliased),
        ds_smem=plgpu.SMEM((2, QUERY_BLOCK, keys), F16, transforms=smem_transforms(F16)),
        dq_smem=output_tiles((q_chunks,), jnp.float32, row_tma),
        stats_smem=plgpu.SMEM((2, QUERY_BLOCK), jnp.float32),
        unscale_smem=plgpu.SMEM((UNSCALE_ROWS, QUERY_BLOCK), jnp.float32),
        own_bar=plgpu.Barrier(num_arrivals=2 * q_chunks + 3),  # Q pairs, lse, delta, unscale
        k_bar=plgpu.Barrier(num_arrivals=2 * q_chunks),
        tile_bar=plgpu.Barrier(num_arrivals=2 * PIECES, num_barriers=STAGES),  # V's, dO's: the producer's
        tile_ready=plgpu.Barrier(num_barriers=STAGES),  # split
        tile_free=plgpu.Barrier(num_barriers=STAGES),
    )
    if with_previous:
        scratch["prev_bar"] = plgpu.Barrier(num_arrivals=q_chunks * PIECES)
    return scratch


def key_side_scratch(keys: int, q_chunks: int, with_previous: bool, row_tma: bool = False,
                     aliased: bool = True) -> dict:
    """The key-side kernel's shared memory and barriers, by name (`aliased=False` for the
    interpreter: mosaic_split.split_buffers)."""
    scratch = dict(
        q_smem=_pair_tiles((q_chunks, keys, CHANNEL_TILE), row_tma),
        k_smem=_pair_tiles((q_chunks, *TILE), row_tma),
        do_smem=split_buffers(STAGES, keys, row_tma, aliased),
        v_smem=split_buffers(OWN_STAGES, QUERY_BLOCK, row_tma, aliased),
        # Pᵀ of this CTA's keys; after the channel loop, dSᵀ.
        pt_smem=plgpu.SMEM((2, QUERY_BLOCK, keys), F16, transforms=smem_transforms(F16)),
        # Two dV tiles in flight to global memory; afterwards, the dK tiles.
        dv_smem=output_tiles((2,), jnp.float32, row_tma),
        stats_smem=plgpu.SMEM((2, keys), jnp.float32),
        unscale_smem=plgpu.SMEM((UNSCALE_ROWS, QUERY_BLOCK), jnp.float32),
        own_bar=plgpu.Barrier(num_arrivals=2 * q_chunks + 3),  # its K pairs, lse, delta, unscale
        strip_bar=plgpu.Barrier(num_arrivals=2 * q_chunks),
        # The producer's: dO's and V's float32 pieces (and the other direction's dV) before it splits.
        do_bar=plgpu.Barrier(num_arrivals=PIECES, num_barriers=STAGES),
        do_free=plgpu.Barrier(num_barriers=STAGES),
        v_bar=plgpu.Barrier(num_arrivals=PIECES + (PIECES if with_previous else 0), num_barriers=OWN_STAGES),
        v_free=plgpu.Barrier(num_barriers=OWN_STAGES),
        tile_ready=plgpu.Barrier(num_barriers=STAGES),  # a tile's dO and V split
    )
    if with_previous:
        scratch.update(dv_prev_smem=output_tiles((OWN_STAGES,), jnp.float32, row_tma),
                       dk_prev_bar=plgpu.Barrier(num_arrivals=q_chunks * PIECES))
    return scratch


def pairs_backward_unsupported(keys: int, q_channels: int) -> str | None:
    """Why the float32 backward kernels cannot take `keys`-key strips with `q_channels` (padded)
    query/key channels, or None if they can."""
    q_chunks = q_channels // CHANNEL_TILE
    if keys > MAX_PAIRS_STRIP:
        return f"strips of {keys} keys exceed {MAX_PAIRS_STRIP}"
    if q_chunks > MAX_PAIRS_QK_CHUNKS:
        return f"{q_channels} query/key channels exceed {MAX_PAIRS_QK_CHUNKS * CHANNEL_TILE}"
    for name, scratch in (("query", query_side_scratch), ("key", key_side_scratch)):
        if not fits_shared_memory(scratch(keys, q_chunks, with_previous=True)):
            return (f"the {name}-side kernel for {keys}-key strips with {q_channels} query/key channels does not fit "
                    "an H100's shared memory")
    return None


def float32_backward_unsupported(h: int, w: int, cqk: int) -> str | None:
    """Why the float32 backward kernels cannot take an HxW map with `cqk` query/key channels, or
    None if they can."""
    q_channels = round_up(cqk, CHANNEL_TILE)
    for length in (w, h):
        problem = pairs_backward_unsupported(round_up(length, QUERY_BLOCK), q_channels)
        if problem is not None:
            return problem
    return None


def _float32_pieces(x: jax.Array) -> list[jax.Array]:
    """A (64, 64) float32 tile as the PIECES (64, 32) pieces its staging tiles hold."""
    return [x[:, i * PIECE:(i + 1) * PIECE] for i in range(PIECES)]


def _store_float32(pieces, staging, staging_tma, strips: MosaicStrips, ref, b, s, own, tile: int) -> None:
    """Stage a float32 tile's pieces and store them by TMA to channel tile `tile` of `own`."""
    for i, x in enumerate(pieces):
        staging.at[i][...] = x
    plgpu.commit_smem()
    for i in range(PIECES):
        plgpu.copy_smem_to_gmem(staging_tma.at[i], strips.view(ref, b, s, own, box(tile * CHANNEL_TILE + i * PIECE,
                                                                                    PIECE)))


def _load_float32(strips: MosaicStrips, ref, b, s, own, tile: int, tiles_tma, barrier) -> None:
    """TMA channel tile `tile` of `own` of a float32 ref into its PIECES staging tiles."""
    for i in range(PIECES):
        plgpu.copy_gmem_to_smem(strips.view(ref, b, s, own, box(tile * CHANNEL_TILE + i * PIECE, PIECE)),
                                tiles_tma.at[i], barrier)


def _store_pair_product(a, b_tiles, row_unscale, unscale, staging, staging_tma, add_staged: bool,
                        strips: MosaicStrips, ref, b, s, own, tile: int) -> None:
    """Store a·b (a (2, 64, K) pair, b_tiles (2, K, 64): three wgmmas), times `row_unscale`
    (a per-row vector) and the scalar `unscale`, as float32 channel tile `tile` of `own`; with
    `add_staged`, plus the tile already in `staging` (the other direction's)."""

    def product(acc):
        for i, j in PAIR_PRODUCTS:
            plgpu.wgmma(acc, a.at[i], b_tiles.at[j])
        return acc[...]

    # The per-row unscale is broadcast after the product: held through it, it would take 32 registers.
    x = pl.run_scoped(product, plgpu.ACC(TILE, jnp.float32))
    x = _float32_pieces(x * per_query(row_unscale, TILE) * unscale)
    if add_staged:
        x = [piece + staging.at[i][...] for i, piece in enumerate(x)]
    _store_float32(x, staging, staging_tma, strips, ref, b, s, own, tile)


def _unscale(unscale_smem, row: int) -> jax.Array:
    """One of the `unscale` constants, as a scalar (a broadcast tile would hold 32 registers)."""
    return unscale_smem[row, 0]


def _unscaled(x: jax.Array, unscale_smem, *rows: int) -> jax.Array:
    """x times the `unscale` constants of `rows`, one at a time."""
    for row in rows:
        x = x * _unscale(unscale_smem, row)
    return x


def _kernel_refs(refs) -> tuple:
    """A kernel's refs: the (hi, lo) pairs of q and k, float32 v and dO, then lse, delta and
    unscale, then the gradients it writes, as a tuple."""
    return refs[0:2], refs[2:4], *refs[4:9], tuple(refs[9:])


def _own_block(strips: MosaicStrips, last_first: bool) -> tuple:
    """(b, s, wg, first, box): this CTA's image, strip and warpgroup, and its 64 queries (query
    side) or keys (key side)."""
    first = lax.axis_index("blk") * QUERY_BLOCK
    b = walk_images(lax.axis_index("b"), strips.batch, last_first)
    return b, lax.axis_index("s"), lax.axis_index("wg"), first, box(first, QUERY_BLOCK)


def _launch(body, strips: MosaicStrips, scratch: dict, operands, gradients, previous, interpret: bool, name: str):
    """The kernel, writing `gradients` (float32, shaped like these arrays): over `previous` (the
    other direction's) in place where given."""
    out_type = [] if previous is not None else [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in gradients]
    return launch(
        body, operands, out_type, in_place=previous or (),
        scratch_types=scratch,
        grid=(strips.batch, strips.num_strips, strips.keys // QUERY_BLOCK),
        grid_names=("b", "s", "blk"),
        num_threads=2,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name=f"criss_cross_mosaic_bwd_f32_{name}_{strips.direction}",
    )


def _query_side(strips: MosaicStrips, q, k, v, dout, lse, delta, unscale, *, interpret: bool, previous,
                last_first: bool):
    """dQ (float32, padded like q) of this direction, plus `previous`."""
    keys = strips.keys
    q_chunks, v_tiles = q[0].shape[-1] // CHANNEL_TILE, v.shape[-1] // CHANNEL_TILE

    def body(*refs, q_smem, k_smem, v_smem, do_smem, ds_smem, dq_smem, stats_smem, unscale_smem, own_bar, k_bar,
             tile_bar, tile_ready, tile_free, prev_bar=None):
        # dq_ref holds the other direction's dQ, if any, until this one is added in.
        q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, unscale_ref, (dq_ref,) = _kernel_refs(refs)
        b, s, wg, qb, own = _own_block(strips, last_first)
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        v_split, do_split = SplitRing.of(v_smem, strips.row_tma), SplitRing.of(do_smem, strips.row_tma)
        dq_tma, dq_smem = tma_and_tiles(dq_smem, strips.row_tma)

        @pl.when(wg == 0)
        def _compute():
            for part, ref in enumerate(q_refs):
                load_own_tiles(strips, ref, b, s, own, [q_tma.at[part, c] for c in range(q_chunks)], own_bar)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, s, own], stats_smem.at[0], own_bar)
            plgpu.copy_gmem_to_smem(delta_ref.at[b, s, own], stats_smem.at[1], own_bar)
            plgpu.copy_gmem_to_smem(unscale_ref.at[b], unscale_smem, own_bar)
            if previous is not None:
                for c in range(q_chunks):
                    _load_float32(strips, dq_ref, b, s, own, c, dq_tma.at[c], prev_bar)

            def channel_loop(dp_acc):
                for t in range(v_tiles):
                    slot = t % STAGES
                    plgpu.barrier_wait(tile_ready.at[slot])
                    for i, j in PAIR_PRODUCTS:
                        plgpu.wgmma(dp_acc, do_split.part(slot, i), v_split.part(slot, j).transpose((1, 0)))
                    plgpu.wgmma_wait(len(PAIR_PRODUCTS))  # tile t - 1's products are done: refill its slot
                    if t >= 1:
                        release_slot(tile_free, t - 1, v_tiles, read_by_thread=False)
                plgpu.wgmma_wait(0)
                return dp_acc[...]

            dp = pl.run_scoped(channel_loop, plgpu.ACC((QUERY_BLOCK, keys), jnp.float32))
            plgpu.barrier_wait(own_bar)
            plgpu.barrier_wait(k_bar)
            sc = scores([q_smem.at[i, c] for c in range(q_chunks) for i, _ in PAIR_PRODUCTS],
                        [k_smem.at[j, c] for c in range(q_chunks) for _, j in PAIR_PRODUCTS], QUERY_BLOCK, keys)
            shape = sc.shape
            lse = per_query(plgpu.load(stats_smem.at[0], layout=ROWS), shape)
            delta = per_query(plgpu.load(stats_smem.at[1], layout=ROWS), shape)
            p = exp_of_difference(_unscaled(sc, unscale_smem, Q_UNSCALE, K_UNSCALE), lse)
            p = jnp.where(live_mask(strips, qb, shape), p, 0.0)
            (ds,) = split_rows([p * (_unscaled(dp, unscale_smem, DO_UNSCALE, V_UNSCALE) - delta)])
            ds_smem.at[0][...] = ds.hi
            ds_smem.at[1][...] = ds.lo
            plgpu.commit_smem()
            if previous is not None:
                plgpu.barrier_wait(prev_bar)
            for c in range(q_chunks):  # dQ = dS·K
                _store_pair_product(ds_smem, k_smem.at[:, c], ds.unscale, _unscale(unscale_smem, K_UNSCALE),
                                    dq_smem.at[c], dq_tma.at[c], previous is not None, strips, dq_ref, b, s, own, c)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _produce():
            load_strip_tiles(strips, b, s, [(ref, k_tma.at[part]) for part, ref in enumerate(k_refs)], q_chunks,
                             k_bar)

            def issue(t):
                slot = t % STAGES
                if t >= STAGES:
                    plgpu.barrier_wait(tile_free.at[slot])
                v_split.load(strips, v_ref, b, s, box(0, keys), t, slot, tile_bar.at[slot])
                do_split.load(strips, do_ref, b, s, own, t, slot, tile_bar.at[slot])

            def scales():  # v's and dO's, which the compute warpgroup's copy brings on own_bar
                plgpu.barrier_wait(own_bar)
                return [_unscale(unscale_smem, V_SCALE), _unscale(unscale_smem, DO_SCALE)]

            produce_split_tiles(v_tiles, STAGES, issue, tile_bar, tile_ready, [v_split, do_split], scales)

    scratch = query_side_scratch(keys, q_chunks, previous is not None, strips.row_tma, aliased=not interpret)
    operands = (*q, *k, v, dout, lse, delta, unscale)
    (dq,) = _launch(body, strips, scratch, operands, [q[0]], previous, interpret, "query_side")
    return dq


def _key_side(strips: MosaicStrips, q, k, v, dout, lse, delta, unscale, *, interpret: bool, previous,
              last_first: bool):
    """(dK, dV) (float32, padded like k and v) of this direction, plus `previous` = (dk, dv)."""
    keys = strips.keys
    q_chunks, v_tiles = q[0].shape[-1] // CHANNEL_TILE, v.shape[-1] // CHANNEL_TILE

    def body(*refs, q_smem, k_smem, do_smem, v_smem, pt_smem, dv_smem, stats_smem, unscale_smem, own_bar, strip_bar,
             do_bar, do_free, v_bar, v_free, tile_ready, dv_prev_smem=None, dk_prev_bar=None):
        # dk_ref and dv_ref hold the other direction's dK and dV, if any, until this one's are added in.
        q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, unscale_ref, (dk_ref, dv_ref) = _kernel_refs(refs)
        b, s, wg, kb, own = _own_block(strips, last_first)
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        do_split, v_split = SplitRing.of(do_smem, strips.row_tma), SplitRing.of(v_smem, strips.row_tma)
        dv_tma, dv_smem = tma_and_tiles(dv_smem, strips.row_tma)
        if previous is not None:
            dv_prev_tma, dv_prev_smem = tma_and_tiles(dv_prev_smem, strips.row_tma)

        @pl.when(wg == 0)
        def _compute():
            for part, ref in enumerate(k_refs):
                load_own_tiles(strips, ref, b, s, own, [k_tma.at[part, c] for c in range(q_chunks)], own_bar)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, s], stats_smem.at[0], own_bar)
            plgpu.copy_gmem_to_smem(delta_ref.at[b, s], stats_smem.at[1], own_bar)
            plgpu.copy_gmem_to_smem(unscale_ref.at[b], unscale_smem, own_bar)
            plgpu.barrier_wait(own_bar)
            plgpu.barrier_wait(strip_bar)

            def per_column(row, queries):  # the strip's queries run along the columns
                return lax.broadcast_in_dim(plgpu.load(stats_smem.at[row, queries], layout=COLUMNS), TILE, [1])

            # Pᵀ = exp(Sᵀ - lse) of this CTA's keys, 64 queries at a time; live_mask is symmetric in
            # queries and keys, and its rows are this CTA's keys here.
            for j in range(keys // QUERY_BLOCK):
                queries = pl.ds(j * QUERY_BLOCK, QUERY_BLOCK)
                st = scores([k_smem.at[i, c] for c in range(q_chunks) for i, _ in PAIR_PRODUCTS],
                            [q_smem.at[part, c, queries] for c in range(q_chunks) for _, part in PAIR_PRODUCTS],
                            QUERY_BLOCK, QUERY_BLOCK)
                pt = exp_of_difference(_unscaled(st, unscale_smem, K_UNSCALE, Q_UNSCALE), per_column(0, queries))
                pt = jnp.where(live_mask(strips, kb, TILE, key_base=j * QUERY_BLOCK), pt, 0.0)
                pt = split(pt, unit_interval=True)
                pt_smem.at[0, :, queries][...] = pt.hi
                pt_smem.at[1, :, queries][...] = pt.lo
            plgpu.commit_smem()

            def tile(t, dp_acc):
                """Channel tile t, whose dO is in ring slot t % STAGES and V in the one own slot; dPᵀ
                accumulates in `dp_acc`."""
                slot, staging = lax.rem(t, STAGES), lax.rem(t, 2)
                plgpu.barrier_wait(tile_ready.at[slot])

                def products(dv_acc):
                    for i, j in PAIR_PRODUCTS:
                        plgpu.wgmma(dp_acc, v_split.part(0, i), do_split.part(slot, j).transpose((1, 0)))
                    for i, j in PAIR_PRODUCTS:
                        plgpu.wgmma(dv_acc, pt_smem.at[i], do_split.part(slot, j))
                    return dv_acc[...]  # reading the accumulator waits for every product

                dv = pl.run_scoped(products, plgpu.ACC(TILE, jnp.float32))
                dv = _float32_pieces(_unscaled(dv, unscale_smem, DO_UNSCALE) * UNIT_UNSCALE)
                if previous is not None:
                    dv = [x + dv_prev_smem.at[0, i][...] for i, x in enumerate(dv)]

                @pl.when(t + STAGES < v_tiles)  # the producer refills the slot
                def _():
                    plgpu.barrier_arrive(do_free.at[slot])

                @pl.when(t + OWN_STAGES < v_tiles)
                def _():
                    if previous is not None:  # dV's tile was read by the threads: fence before TMA refills it
                        plgpu.commit_smem()
                    plgpu.barrier_arrive(v_free.at[0])

                plgpu.wait_smem_to_gmem(PIECES, wait_read_only=True)  # the stores two tiles ago have read it
                _store_float32(dv, dv_smem.at[staging], dv_tma.at[staging], strips, dv_ref, b, s, own, t)

            def channel_loop(dp_acc):
                # A rolled loop: unrolled over the 8 tiles, the kernel spilled 88-132 bytes (ptxas,
                # sm_90a); unrolled by two (a static ring slot each), 252.
                @pl.loop(0, v_tiles)
                def _tile(t):
                    tile(t, dp_acc)

                return dp_acc[...]

            dp = pl.run_scoped(channel_loop, plgpu.ACC((QUERY_BLOCK, keys), jnp.float32))
            # dSᵀ = Pᵀ ⊙ (dPᵀ - delta), 64 queries at a time beside the whole dPᵀ; Pᵀ from its pair.
            dst = []
            for j in range(keys // QUERY_BLOCK):
                queries = pl.ds(j * QUERY_BLOCK, QUERY_BLOCK)
                pt = sum(plgpu.load(pt_smem.at[i, :, queries], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                         for i in range(2)) * UNIT_UNSCALE
                dp_j = _unscaled(dp[:, j * QUERY_BLOCK:(j + 1) * QUERY_BLOCK], unscale_smem, DO_UNSCALE, V_UNSCALE)
                dst.append(pt * (dp_j - per_column(1, queries)))
            dst = split_rows(dst)
            for j, pair in enumerate(dst):
                queries = pl.ds(j * QUERY_BLOCK, QUERY_BLOCK)
                pt_smem.at[0, :, queries][...] = pair.hi
                pt_smem.at[1, :, queries][...] = pair.lo
            plgpu.commit_smem()
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the dV stores have read the staging tiles
            if previous is not None:
                for c in range(q_chunks):
                    _load_float32(strips, dk_ref, b, s, own, c, dv_tma.at[c], dk_prev_bar)
                plgpu.barrier_wait(dk_prev_bar)
            for c in range(q_chunks):  # dK = dSᵀ·Q
                _store_pair_product(pt_smem, q_smem.at[:, c], dst[0].unscale, _unscale(unscale_smem, Q_UNSCALE),
                                    dv_smem.at[c], dv_tma.at[c], previous is not None, strips, dk_ref, b, s, own, c)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _produce():
            load_strip_tiles(strips, b, s, [(ref, q_tma.at[part]) for part, ref in enumerate(q_refs)], q_chunks,
                             strip_bar)

            def issue_dout(t):
                slot = t % STAGES
                if t >= STAGES:
                    plgpu.barrier_wait(do_free.at[slot])
                do_split.load(strips, do_ref, b, s, box(0, keys), t, slot, do_bar.at[slot])

            def issue_own(t):  # V's tile and the other direction's dV tile, in the one own slot
                if t >= OWN_STAGES:
                    plgpu.barrier_wait(v_free.at[0])
                v_split.load(strips, v_ref, b, s, own, t, 0, v_bar.at[0])
                if previous is not None:
                    _load_float32(strips, dv_ref, b, s, own, t, dv_prev_tma.at[0], v_bar.at[0])

            issue_dout(0)
            issue_own(0)
            plgpu.barrier_wait(own_bar)  # the compute warpgroup's copy of the scales
            v_scale, do_scale = _unscale(unscale_smem, V_SCALE), _unscale(unscale_smem, DO_SCALE)
            for t in range(v_tiles):
                slot = t % STAGES
                if t + 1 < v_tiles:  # dO's other slot fills while this tile is split
                    issue_dout(t + 1)
                plgpu.barrier_wait(do_bar.at[slot])
                do_split.split(slot, do_scale)
                plgpu.barrier_wait(v_bar.at[0])
                v_split.split(0, v_scale)
                plgpu.barrier_arrive(tile_ready.at[slot])
                if t + 1 < v_tiles:  # once the compute warpgroup is done with this tile's V
                    issue_own(t + 1)

    scratch = key_side_scratch(keys, q_chunks, previous is not None, strips.row_tma, aliased=not interpret)
    operands = (*q, *k, v, dout, lse, delta, unscale)
    return _launch(body, strips, scratch, operands, [k[0], v], previous, interpret, "key_side")


def strip_backward_pairs(
    strips: MosaicStrips,
    q: tuple[jax.Array, jax.Array],
    k: tuple[jax.Array, jax.Array],
    v: jax.Array,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    unscale: jax.Array,
    *,
    interpret: bool,
    previous: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    images_last_first: tuple[bool, bool] = (False, False),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One direction's float32 gradients, on float16 pairs.

    Args:
      strips: this direction's strips, of at most 128 pixels, one 64-query
        (or 64-key) warpgroup a CTA.
      q, k: (B, H, W, Cqp) as (hi, lo) float16 pairs of the channel-padded
        float32 maps (mosaic_layout.pad_map); v, dout: (B, H, W, Cvp) float32,
        channel-padded, whose tiles the kernels split (with the scales in
        `unscale`).
      lse, delta: (B, num_strips, stats_length) float32 for these strips: the
        merged log-sum-exp and sum_c dO·O of each pixel.
      unscale: (B, UNSCALE_ROWS, 64) float32 from `pairs_unscale`.
      previous: the other direction's float32 (dq, dk, dv), added in and
        overwritten with the sums (not to be used after the call).
      images_last_first: for the query-side and the key-side kernel, whether
        its CTAs take the images from the last (mosaic_work.walk_images).

    Returns:
      (dq, dk, dv), float32, padded like the inputs (pixels past the valid
      ones unwritten, or as `previous` left them).
    """
    problem = pairs_backward_unsupported(strips.keys, q[0].shape[-1])
    if problem is not None:
        raise ValueError(f"strip_backward_pairs: {problem}")
    if strips.query_warpgroups != 1:
        raise ValueError("strip_backward_pairs: the kernels run one warpgroup a CTA; build the strips with "
                         "max_query_warpgroups=1")
    operands = (q, k, v, dout, lse, delta, unscale)
    dq = _query_side(strips, *operands, interpret=interpret, previous=None if previous is None else previous[:1],
                     last_first=images_last_first[0])
    dk, dv = _key_side(strips, *operands, interpret=interpret, previous=None if previous is None else previous[1:],
                       last_first=images_last_first[1])
    return dq, dk, dv
