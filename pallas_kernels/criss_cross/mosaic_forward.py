"""Forward Mosaic GPU (Hopper) kernel: exact softmax over a whole strip, per direction.

A CTA owns 64 or 128 queries of one strip (one row or one column of one
image): one or two compute warpgroups of 64 queries each, and a producer
warpgroup that streams the strip's keys and value tiles by TMA. Each
compute warpgroup
  1. computes S = Q·Kᵀ over every key of the strip with wgmma (the strip's
     keys fit: at most 256),
  2. masks padded keys (and, in the column pass, the pixel itself), and takes
     the exact log-sum-exp of its rows,
  3. writes P = exp(S - lse), taken as exp(S - m)·exp(m - lse) from the
     exponentials the sum took, in the input dtype to shared memory once, and
  4. for each 64-channel tile of V: O = P·V with wgmma, stored by TMA.
Intermediates stay in the input dtype; there is no online-softmax rescaling.
With `value_splits` > 1, that many CTAs share the strip's queries, each with
its share of the value tiles (steps 1-3 repeated by each): more CTAs where a
small batch leaves SMs idle. Each (strip, query block, value split) is a work
item; `persistent_ctas` launches that many CTAs (one per SM) that loop over
the items (mosaic_work) instead of one CTA per item: each warpgroup loads the
next item's queries once it has its scores, the producer the next item's keys
once both have theirs, and the value ring runs on from item to item, so that
an item's loads overlap the previous item's value tiles.

The row pass writes o_row (normalised within the row) and lse_row. The column
pass takes them as `previous` and merges exactly in its epilogue, writing
its output over o_row (in place):
    lse = logaddexp(lse_row, lse_col)
    out = exp(lse_row - lse) * o_row + exp(S - lse)·V
(the second term is its own P·V with P = exp(S - lse) taken against the
merged lse).

float32 inputs arrive as float16 pairs where they are small (q and k:
tile_products.split_images, hi + lo, scaled by a power of two from each
image's largest magnitude) and as float32 where they are large (v): the
producer splits each V tile in shared memory, in place, with its image's scale
(mosaic_split), 32 channels at a time. Every product is three wgmmas (lo·hi,
hi·lo, hi·hi): S and P·V come out as float32 would give them, to about
2^-22. P is split the same way in registers (scale 2^13), the output and the
row result are float32, and `unscale` carries the factors that undo the
scales. Twice the operands' shared memory leaves one query warpgroup per CTA
and strips of up to 128 pixels (64 query/key channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.criss_cross.mosaic_layout import (
    CHANNEL_TILE,
    FLOAT32_PIECE,
    QUERY_BLOCK,
    MosaicStrips,
    box,
    interpret_params,
    launch,
    smem_transforms,
    tile_buffer,
    tma_and_tiles,
)
from pallas_kernels.criss_cross.mosaic_split import SplitRing, split_buffers
from pallas_kernels.criss_cross.mosaic_tiles import (
    ROWS,
    STAGES,
    exp_of_difference,
    live_mask,
    load_own_tiles,
    load_strip_tiles,
    log_add_exp,
    per_query,
    release_slot,
    ring_slot,
    scores,
    stream_channel_tiles,
    warpgroups_that_fit,
    when_ring_went_round,
)
from pallas_kernels.criss_cross.mosaic_work import WorkItem, WorkItems
from pallas_kernels.criss_cross.reference import MASK_VALUE
from pallas_kernels.criss_cross.tile_products import UNIT_UNSCALE, split

# (left part, right part) of each product of float16 pairs: lo·hi, hi·lo, hi·hi, the smallest
# first; lo·lo (2^-22 of the product) is dropped.
PAIR_PRODUCTS = ((1, 0), (0, 1), (0, 0))


# Rows of each image's (UNSCALE_ROWS, 64) block of the float32 forward's `unscale` operand, each
# one constant.
Q_UNSCALE, K_UNSCALE, V_UNSCALE, V_SCALE = range(4)
UNSCALE_ROWS = 4


def forward_unscale(q_unscale: jax.Array, k_unscale: jax.Array, v_scales: jax.Array) -> jax.Array:
    """The float32 forward's (B, UNSCALE_ROWS, 64) `unscale` operand from q's and k's unscales (B,)
    and v's (scale, unscale) (B, 2) (tile_products.split_images, mosaic_split.map_scales)."""
    rows = jnp.stack([q_unscale, k_unscale, v_scales[:, 1], v_scales[:, 0]], axis=1)
    return jnp.broadcast_to(rows[:, :, None], (*rows.shape, QUERY_BLOCK)).astype(jnp.float32)


def part_products(parts: int) -> tuple[tuple[int, int], ...]:
    """The (left part, right part) products that make one product of operands in `parts` parts."""
    return ((0, 0),) if parts == 1 else PAIR_PRODUCTS


def output_pieces(dtype) -> int:
    """Pieces of a 64-channel output tile in `dtype`: two of 32 channels for float32 (a 128-byte
    swizzled row each), one for 16-bit values."""
    return CHANNEL_TILE // FLOAT32_PIECE if jnp.dtype(dtype) == jnp.float32 else 1


def output_tiles(leading: tuple[int, ...], dtype, row_tma: bool):
    """Buffers of (64 positions, 64 channels) output tiles in `dtype`, float32 ones in pieces."""
    pieces = output_pieces(dtype)
    if pieces > 1:
        return tile_buffer((*leading, pieces, QUERY_BLOCK, CHANNEL_TILE // pieces), dtype, row_tma)
    return tile_buffer((*leading, QUERY_BLOCK, CHANNEL_TILE), dtype, row_tma)


def forward_scratch(n_wg: int, keys: int, q_chunks: int, stages: int, dtype, with_previous: bool,
                    row_tma: bool = False, aliased: bool = True, persistent: bool = False) -> dict:
    """The forward kernel's shared memory and barriers, by name, for inputs of `dtype` (float32:
    q and k as float16 pairs, V's float32 tiles split in place, float32 output tiles;
    `aliased=False` for the interpreter: mosaic_split.split_buffers; `persistent`: a barrier on
    which the compute warpgroups free the keys for the next work item's)."""
    pairs = jnp.dtype(dtype) == jnp.float32
    parts, operand = (2, jnp.float16) if pairs else (1, dtype)
    scratch = dict(
        q_smem=tile_buffer((n_wg, parts, q_chunks, QUERY_BLOCK, CHANNEL_TILE), operand, row_tma),
        k_smem=tile_buffer((parts, q_chunks, keys, CHANNEL_TILE), operand, row_tma),
        p_smem=plgpu.SMEM((n_wg, parts, QUERY_BLOCK, keys), operand, transforms=smem_transforms(operand)),
        o_smem=output_tiles((n_wg, 2), dtype, row_tma),
        lse_smem=plgpu.SMEM((n_wg, QUERY_BLOCK), jnp.float32),
        q_bar=plgpu.Barrier(num_arrivals=parts * q_chunks, num_barriers=n_wg),
        k_bar=plgpu.Barrier(num_arrivals=parts * q_chunks, num_barriers=1),
        v_free=plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages),
    )
    if persistent:
        scratch.update(k_free=plgpu.Barrier(num_arrivals=n_wg, num_barriers=1))
    if pairs:
        scratch.update(
            v_smem=split_buffers(stages, keys, row_tma, aliased),
            # The producer's: V's float32 pieces land on it before it splits them.
            v_bar=plgpu.Barrier(num_arrivals=output_pieces(dtype), num_barriers=stages),
            v_ready=plgpu.Barrier(num_barriers=stages),
            unscale_smem=plgpu.SMEM((n_wg, UNSCALE_ROWS, QUERY_BLOCK), jnp.float32),
            unscale_bar=plgpu.Barrier(num_barriers=n_wg),
        )
    else:
        scratch.update(
            v_smem=tile_buffer((stages, keys, CHANNEL_TILE), operand, row_tma),
            v_bar=plgpu.Barrier(num_barriers=stages),
        )
    if with_previous:
        scratch.update(
            prev_smem=output_tiles((stages, n_wg), dtype, row_tma),
            lse_prev_smem=plgpu.SMEM((n_wg, QUERY_BLOCK), jnp.float32),
            prev_bar=plgpu.Barrier(num_arrivals=output_pieces(dtype), num_barriers=stages * n_wg),
            lse_prev_bar=plgpu.Barrier(num_barriers=n_wg),
        )
    return scratch


def forward_warpgroups(keys: int, q_channels: int, stages: int, dtype, wanted: int) -> int:
    """Query warpgroups per CTA, at most `wanted`, whose forward (the column pass, which also
    holds the row result's tiles) fits in shared memory, for inputs of `dtype`; 0 if not even
    one does."""
    q_chunks = q_channels // CHANNEL_TILE
    return warpgroups_that_fit(lambda n_wg: forward_scratch(n_wg, keys, q_chunks, stages, dtype, with_previous=True),
                               min(wanted, keys // QUERY_BLOCK))


def strip_forward_mosaic(
    strips: MosaicStrips,
    q: jax.Array | tuple[jax.Array, jax.Array],
    k: jax.Array | tuple[jax.Array, jax.Array],
    v: jax.Array,
    *,
    interpret: bool,
    stages: int = STAGES,
    value_splits: int = 1,
    previous: tuple[jax.Array, jax.Array] | None = None,
    unscale: jax.Array | None = None,
    persistent_ctas: int | None = None,
    images_last_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One direction's pass over NHWC inputs, with `stages` value tiles in flight and the value
    tiles shared among `value_splits` CTAs (which must divide their count); with
    `persistent_ctas`, that many CTAs (16-bit inputs only) loop over the work items
    (mosaic_work), each loading the next item's queries and keys under the current one's
    value tiles, through one ring that runs on from item to item. With `images_last_first`
    the CTAs take the images from the last (mosaic_work.walk_images).

    Args:
      q, k: (B, H, W, Cqp) and v: (B, H, W, Cvp), 16-bit, channels padded
        by `mosaic_layout.pad_map` to multiples of 64 (H and W too, to
        multiples of 8, unless `strips.row_tma` or interpreting); or, for
        float32 inputs, q and k each as its (hi, lo) float16 pair and v
        float32 (the producer splits its tiles: mosaic_split).
      previous: for the column pass, (o_row (B, H, W, Cvp) in the output
        dtype, lse_row (B, W, stats_length) float32, i.e. indexed by this
        pass's strips); the output is written over o_row, and without value
        splits the merged lse over lse_row (in place: neither is to be used
        after the call).
      unscale: with pairs, (B, UNSCALE_ROWS, 64) float32 from
        `forward_unscale`, each image's rows one constant each: the factors that undo q's,
        k's and v's scales (P's is fixed), applied one at a time (their
        product could leave float32's normal range where the result does
        not), and v's scale, with which its tiles are split.

    Returns:
      out: (B, H, W, Cvp) in v's dtype, float32 for pairs (rows or columns
        past the valid ones unwritten, or as o_row left them); lse:
        (B, num_strips, stats_length) float32.
    """
    q_parts, k_parts = (x if isinstance(x, tuple) else (x,) for x in (q, k))
    parts = len(q_parts)
    pairs = parts == 2
    if pairs != (unscale is not None) or pairs != (v.dtype == jnp.float32):
        raise ValueError("strip_forward_mosaic: float32 inputs take q and k as float16 pairs, v as float32 and "
                         "`unscale`; 16-bit inputs take none")
    n_wg = strips.query_warpgroups
    keys = strips.keys
    dtype = v.dtype  # of the output and the row result
    q_chunks = q_parts[0].shape[-1] // CHANNEL_TILE
    value_tiles = v.shape[-1] // CHANNEL_TILE
    if value_tiles % value_splits:
        raise ValueError(f"strip_forward_mosaic: {value_splits} value splits do not divide {value_tiles} value tiles")
    if pairs and n_wg != 1:  # the producer splits each V tile for one compute warpgroup, with its registers
        raise ValueError("strip_forward_mosaic: float32 strips take one query warpgroup a CTA")
    work = WorkItems((strips.batch, strips.num_strips, strips.query_blocks, value_splits), persistent_ctas,
                     images_last_first)
    if pairs and work.persistent:  # the producer's split of V's tiles runs within one work item
        raise ValueError("strip_forward_mosaic: the persistent forward takes 16-bit inputs; float32 runs one CTA "
                         "per work item")
    v_tiles = value_tiles // value_splits  # per CTA
    queries_per_cta = QUERY_BLOCK * n_wg
    tile_shape = (QUERY_BLOCK, CHANNEL_TILE)
    pieces = output_pieces(dtype)
    products = part_products(parts)

    def body(*refs, q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, v_free, k_free=None,
             prev_smem=None, lse_prev_smem=None, prev_bar=None, lse_prev_bar=None, unscale_smem=None,
             unscale_bar=None, v_ready=None):
        q_refs, k_refs, v_ref = refs[:parts], refs[parts:2 * parts], refs[2 * parts]
        refs = refs[2 * parts + 1:]
        if pairs:
            unscale_ref, *refs = refs
        if previous is None:
            out_ref, lse_ref = refs
        elif lse_in_place:  # out_ref and lse_ref hold the row's until this CTA's merged ones replace them
            out_ref, lse_ref = refs
            lse_prev_ref = lse_ref
        else:  # out_ref holds the row result until each tile's merged result is written over it
            lse_prev_ref, out_ref, lse_ref = refs
        wg = lax.axis_index("wg")
        q_tma, q_smem = tma_and_tiles(q_smem, strips.row_tma)
        k_tma, k_smem = tma_and_tiles(k_smem, strips.row_tma)
        if pairs:
            v_split = SplitRing.of(v_smem, strips.row_tma)
        else:
            v_tma, v_smem = tma_and_tiles(v_smem, strips.row_tma)
        o_tma, o_smem = tma_and_tiles(o_smem, strips.row_tma)
        if previous is not None:
            prev_tma, prev_smem = tma_and_tiles(prev_smem, strips.row_tma)

        def query_base(item: WorkItem, w):
            return item.block * queries_per_cta + w * QUERY_BLOCK

        width = CHANNEL_TILE // pieces

        def tiles_of(tile):
            """A 64-channel tile's shared-memory pieces (float32: two of 32 channels)."""
            return [tile.at[i] for i in range(pieces)] if pairs else [tile]

        def pieces_of(x):
            """The register pieces of a (64, 64) tile that match `tiles_of`."""
            return [x[:, i * width:(i + 1) * width] for i in range(pieces)] if pairs else [x]

        def load_queries(item: WorkItem):
            """This warpgroup's queries of a work item, and their row lse in the column pass."""
            own = box(query_base(item, wg), QUERY_BLOCK)
            for part, ref in enumerate(q_refs):
                load_own_tiles(strips, ref, item.b, item.s, own, [q_tma.at[wg, part, c] for c in range(q_chunks)],
                               q_bar.at[wg])
            if previous is not None:
                plgpu.copy_gmem_to_smem(lse_prev_ref.at[item.b, item.s, own], lse_prev_smem.at[wg],
                                        lse_prev_bar.at[wg])

        def attend(item: WorkItem, step, next_item, items_after):
            """One work item's queries of this warpgroup: scores, softmax, P·V tile by tile. In a
            persistent loop, the next item's queries load once this one's are read."""
            b, s = item.b, item.s
            qb = query_base(item, wg)
            own = box(qb, QUERY_BLOCK)
            first_tile = item.split * v_tiles
            ring_offset = step * v_tiles  # a Python 0 without a persistent loop: static slots
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(k_bar.at[0])
            sc = scores([q_smem.at[wg, i, c] for c in range(q_chunks) for i, _ in products],
                        [k_smem.at[j, c] for c in range(q_chunks) for _, j in products], QUERY_BLOCK, keys)
            if work.persistent:  # the scores are in registers: the producer may load the next strip's keys
                pl.when(items_after > 0)(lambda: plgpu.barrier_arrive(k_free.at[0]))
            if pairs:
                plgpu.barrier_wait(unscale_bar.at[wg])
                sc = sc * unscale_smem[wg, Q_UNSCALE, 0] * unscale_smem[wg, K_UNSCALE, 0]
            sc = jnp.where(live_mask(strips, qb, sc.shape), sc, MASK_VALUE)
            m = sc.max(axis=1)
            # One exponential per score: P = exp(S - m) · exp(m - lse). Taking exp(S - lse) after
            # the sum would take a second, and the special-function units, 16 a clock per SM, are
            # what the softmax's time goes to.
            p = exp_of_difference(sc, per_query(m, sc.shape))
            lse = m + jnp.log(p.sum(axis=1))
            if previous is not None:
                plgpu.barrier_wait(lse_prev_bar.at[wg])
                lse_prev = plgpu.load(lse_prev_smem.at[wg], layout=ROWS)
                lse = log_add_exp(lse_prev, lse)
                prev_weight = per_query(jnp.exp(lse_prev - lse), (QUERY_BLOCK, width))
            p = p * per_query(jnp.exp(m - lse), sc.shape)
            if pairs:
                p_pair = split(p, unit_interval=True)
                p_smem.at[wg, 0][...] = p_pair.hi
                p_smem.at[wg, 1][...] = p_pair.lo
            else:
                p_smem.at[wg, 0][...] = p.astype(dtype)
            if work.persistent:  # the previous item's lse store has read lse_smem (only its last tile's may be left)
                plgpu.wait_smem_to_gmem(pieces, wait_read_only=True)
            lse_smem.at[wg][...] = lse
            plgpu.commit_smem()  # also: every thread has read the row lse before the next item's overwrites it
            if work.persistent:
                pl.when(items_after > 0)(lambda: load_queries(next_item()))

            @pl.when(item.split == 0)  # every split has the same lse
            def _():
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, s, own])
            for t in range(v_tiles):
                slot = ring_slot(ring_offset, t, stages)
                plgpu.barrier_wait((v_ready if pairs else v_bar).at[slot])
                v_parts = [v_split.part(slot, j) for j in range(parts)] if pairs else [v_smem.at[slot]]

                def pv(acc, v_parts=v_parts):
                    for i, j in products:
                        plgpu.wgmma(acc, p_smem.at[wg, i], v_parts[j])
                    return acc[...]

                o = pl.run_scoped(pv, plgpu.ACC(tile_shape, jnp.float32))
                if pairs:
                    o = o * unscale_smem[wg, V_UNSCALE, 0] * UNIT_UNSCALE  # v's scale, then P's
                o = pieces_of(o)
                if previous is not None:
                    plgpu.barrier_wait(prev_bar.at[slot * n_wg + wg])
                    o = [x + prev_weight * tile[...].astype(jnp.float32)
                         for x, tile in zip(o, tiles_of(prev_smem.at[slot, wg]))]
                release_slot(v_free, t, v_tiles, read_by_thread=previous is not None, stages=stages,
                             ring_offset=ring_offset, tiles_after=items_after * v_tiles)
                # The stores issued two tiles ago have read this staging buffer (in a persistent
                # loop, a wait that the ring's first two tiles need not make).
                when_ring_went_round(ring_offset + t, 2, lambda: plgpu.wait_smem_to_gmem(pieces, wait_read_only=True))
                staging = ring_slot(ring_offset, t, 2)
                for x, tile in zip(o, tiles_of(o_smem.at[wg, staging])):
                    tile[...] = x.astype(dtype)
                plgpu.commit_smem()
                for i, tile in enumerate(tiles_of(o_tma.at[wg, staging])):
                    channels = box((first_tile + t) * CHANNEL_TILE + i * width, width)
                    plgpu.copy_smem_to_gmem(tile, strips.view(out_ref, b, s, own, channels))

        @pl.when(wg < n_wg)
        def _compute():
            if n_wg == 2:
                plgpu.set_max_registers(232, action="increase")
            load_queries(work.first())
            if pairs:
                plgpu.copy_gmem_to_smem(unscale_ref.at[work.first().b], unscale_smem.at[wg], unscale_bar.at[wg])
            work.run(attend)
            plgpu.wait_smem_to_gmem(0)

        def load_keys(item: WorkItem):
            load_strip_tiles(strips, item.b, item.s, [(ref, k_tma.at[part]) for part, ref in enumerate(k_refs)],
                             q_chunks, k_bar.at[0])

        def produce(item: WorkItem, step, next_item, items_after):
            """One work item's value tiles (with the row result's, in the column pass); in a
            persistent loop, the next item's keys once this item's scores are taken."""
            prefetch = None
            if work.persistent:
                def prefetch():
                    @pl.when(items_after > 0)
                    def _():
                        plgpu.barrier_wait(k_free.at[0])
                        load_keys(next_item())

            def scales():  # v's, for the producer's split of V's float32 tiles
                plgpu.barrier_wait(unscale_bar.at[0])
                return [unscale_smem[0, V_SCALE, 0]]

            stream_channel_tiles(
                strips, item.b, item.s, num_tiles=v_tiles, rings=[(v_ref, v_split if pairs else v_tma)],
                ring_full=v_bar, ring_free=v_free,
                per_warpgroup=None if previous is None else (
                    out_ref, prev_tma, prev_bar, [query_base(item, w) for w in range(n_wg)]),
                first_tile=item.split * v_tiles, split=(v_ready, scales) if pairs else None,
                ring_offset=step * v_tiles, prefetch=prefetch,
            )

        @pl.when(wg == n_wg)
        def _produce():
            if n_wg == 2:
                plgpu.set_max_registers(40, action="decrease")
            load_keys(work.first())
            work.run(produce)

    scratch = forward_scratch(n_wg, keys, q_chunks, stages, dtype, previous is not None, strips.row_tma,
                              aliased=not interpret, persistent=work.persistent)
    lse_shape = (strips.batch, strips.num_strips, strips.stats_length)
    operands = (*q_parts, *k_parts, v) + ((unscale,) if pairs else ())
    # With one CTA a query block, that CTA alone reads the row's lse of its queries (first) and
    # writes their merged lse, so the merged lse can take the row's buffer too; with value splits,
    # every split reads it and the first writes, so it goes to a buffer of its own.
    lse_in_place = previous is not None and value_splits == 1
    out_type = [jax.ShapeDtypeStruct(lse_shape, jnp.float32)]
    in_place = ()
    if previous is None:
        out_type.insert(0, jax.ShapeDtypeStruct(v.shape, dtype))
    elif lse_in_place:
        out_type, in_place = [], previous
    else:
        operands += (previous[1],)
        in_place = (previous[0],)
    return launch(
        body, operands, out_type, in_place=in_place,
        scratch_types=scratch,
        grid=work.launch_grid,
        grid_names=work.grid_names,
        num_threads=n_wg + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name=f"criss_cross_mosaic_fwd_{strips.direction}",
    )
