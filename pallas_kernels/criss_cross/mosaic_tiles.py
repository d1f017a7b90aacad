"""Pieces both Mosaic GPU kernels share: strip loads, the ring of channel tiles, Q·Kᵀ, masks.

The producer warpgroup loads whole-strip tiles once (queries and keys), then
streams 64-channel tiles of the strip-long operands (V; in the backward dO,
and the output where the kernel sums delta) through a ring of shared-memory
slots (STAGES unless configured), with per-warpgroup
tiles of the other direction's result alongside. A consumer releases a slot
once it has read it; the producer waits for that before refilling it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.criss_cross.config import H100_SHARED_MEMORY_BYTES
from pallas_kernels.criss_cross.mosaic_layout import CHANNEL_TILE, QUERY_BLOCK, MosaicStrips, box
from pallas_kernels.criss_cross.mosaic_split import produce_split_tiles

# Channel tiles in flight between the producer and the compute warpgroups: the backward's
# number, and the forward's where its caller names none (the op itself resolves
# MosaicConfig.stages, 3 where it fits, in mosaic_op.forward_strips).
STAGES = 2
ROWS = plgpu.Layout.WGMMA.reduce(1)  # a per-query vector in the layout of a wgmma result's rows
_LOG2_E = float(np.log2(np.e))


# Mosaic GPU places each scratch buffer at a 1024-byte boundary; barriers and its own
# bookkeeping take a few hundred bytes more (2 152 were seen at 256 keys): keep 4 KiB spare.
_SMEM_ALIGNMENT = 1024
_SMEM_SPARE = 4096


def fits_shared_memory(scratch: dict) -> bool:
    """Whether a kernel's scratch (shared-memory refs and barriers) fits an H100 block's 227 KiB."""
    total = _SMEM_SPARE
    for ref in jax.tree.leaves(list(scratch.values()), is_leaf=lambda x: isinstance(x, plgpu.RefUnion)):
        if isinstance(ref, plgpu.Barrier):
            continue  # within the spare bytes
        size = int(np.prod(ref.shape)) * jnp.dtype(ref.dtype).itemsize
        total += -(-size // _SMEM_ALIGNMENT) * _SMEM_ALIGNMENT
    return total <= H100_SHARED_MEMORY_BYTES


def warpgroups_that_fit(scratch_for, most: int) -> int:
    """The most warpgroups per CTA, at most `most`, whose scratch `scratch_for(n_wg)` fits in
    shared memory; 0 if not even one does."""
    for n_wg in range(most, 0, -1):
        if fits_shared_memory(scratch_for(n_wg)):
            return n_wg
    return 0


def load_strip_tiles(strips: MosaicStrips, b, s, pairs: Sequence[tuple], chunks: int, barrier) -> None:
    """TMA every (gmem ref, smem (chunks, keys, 64)) pair's whole strip, chunk by chunk, onto one
    barrier (which expects len(pairs) * chunks arrivals)."""
    for c in range(chunks):
        channels = box(c * CHANNEL_TILE, CHANNEL_TILE)
        for ref, smem in pairs:
            plgpu.copy_gmem_to_smem(strips.view(ref, b, s, box(0, smem.shape[1]), channels), smem.at[c], barrier)


def load_own_tiles(strips: MosaicStrips, ref, b, s, own: pl.Slice, tiles: Sequence, barrier) -> None:
    """TMA the positions `own` of strip s of `ref`, 64 channels into each of `tiles` in turn, onto
    `barrier` (one arrival per tile; the caller waits)."""
    for c, tile in enumerate(tiles):
        plgpu.copy_gmem_to_smem(strips.view(ref, b, s, own, box(c * CHANNEL_TILE, CHANNEL_TILE)), tile, barrier)


def stream_channel_tiles(
    strips: MosaicStrips,
    b,
    s,
    *,
    num_tiles: int,
    rings: Sequence[tuple],
    ring_full,
    ring_free,
    per_warpgroup: tuple | None = None,
    first_tile=0,
    split: tuple | None = None,
    ring_offset=0,
    prefetch=None,
) -> None:
    """The producer's loop over 64-channel tiles first_tile ... first_tile + num_tiles - 1.

    rings: (gmem ref, smem (stages, keys, 64)) pairs, loaded strip-long into slot t % stages on
      ring_full[slot] (which expects len(rings) arrivals); `stages` is their leading dimension.
      With `split`, (float32 gmem ref, mosaic_split.SplitRing) pairs, a copy (and arrival) per
      float32 piece.
    per_warpgroup: (gmem ref, smem (stages, n_wg, 64, 64), barrier (stages * n_wg), query
      bases): each warpgroup's 64 positions of the tile, on its own barrier. A float32 ref's
      tiles are smem (stages, n_wg, pieces, 64, 64 / pieces), one copy (and arrival) per piece.
    split: (ring_ready, scales): the producer itself waits for each tile's ring copies on
      ring_full, splits the float32 tiles into float16 pairs in place (with the scales that
      `scales()`, called once before the first split, gives each ring), and arrives on
      ring_ready[slot] (one arrival), which the consumers wait instead. It splits a tile while
      the next stages - 1 tiles' copies are in flight (consumers must free a tile's slot once
      done with that tile, as the forward's do: mosaic_split.produce_split_tiles).
    ring_offset: tiles the ring carried before this call's first (a traced count in a
      persistent kernel's loop, whose ring runs on from one work item to the next): tile t
      takes slot (ring_offset + t) % stages and waits for it to be freed unless the ring has
      not yet been round once. Not with `split`.
    prefetch: called once the first `stages` tiles (or all, if fewer) are issued: a
      persistent kernel loads the next work item's strip-long operands there, which its
      consumers free before they take the first value tile.
    """
    split_rings = split is not None
    stages = rings[0][1].slots if split_rings else rings[0][1].shape[0]
    if split_rings and (not isinstance(ring_offset, int) or ring_offset or prefetch is not None):
        raise ValueError("stream_channel_tiles: split rings run within one work item")

    def issue(t: int) -> None:
        slot = ring_slot(ring_offset, t, stages)
        when_ring_went_round(ring_offset + t, stages, lambda: plgpu.barrier_wait(ring_free.at[slot]))
        channels = box((first_tile + t) * CHANNEL_TILE, CHANNEL_TILE)
        for ref, smem in rings:
            if split_rings:
                smem.load(strips, ref, b, s, box(0, smem.positions), first_tile + t, slot, ring_full.at[slot])
            else:
                plgpu.copy_gmem_to_smem(strips.view(ref, b, s, box(0, smem.shape[1]), channels), smem.at[slot],
                                        ring_full.at[slot])
        if per_warpgroup is not None:
            ref, smem, barrier, bases = per_warpgroup
            pieces = smem.shape[2] if len(smem.shape) == 5 else 1
            width = CHANNEL_TILE // pieces
            for w, base in enumerate(bases):
                for piece in range(pieces):
                    tile = smem.at[slot, w, piece] if pieces > 1 else smem.at[slot, w]
                    start = (first_tile + t) * CHANNEL_TILE + piece * width
                    plgpu.copy_gmem_to_smem(strips.view(ref, b, s, box(base, QUERY_BLOCK), box(start, width)), tile,
                                            barrier.at[slot * len(bases) + w])

    if not split_rings:
        for t in range(num_tiles):
            issue(t)
            if prefetch is not None and t == min(stages, num_tiles) - 1:
                prefetch()
        return
    ring_ready, scales = split
    # The consumers free each tile's slot once done with that tile, so each step may issue first.
    produce_split_tiles(num_tiles, stages, issue, ring_full, ring_ready, [ring for _, ring in rings], scales,
                        issue_first=True)


def ring_slot(ring_offset, t: int, slots: int):
    """The slot of a work item's tile t in a ring of `slots` that has carried `ring_offset` tiles
    before the item's first: a Python int while the offset is one (no persistent loop)."""
    if isinstance(ring_offset, int):
        return (ring_offset + t) % slots
    return lax.rem(ring_offset + t, slots)


def when_ring_went_round(tiles_before, slots: int, fn) -> None:
    """Run `fn` (a wait for a slot's previous tile) if the ring has carried `slots` tiles before
    this one: decided while tracing where `tiles_before` is a Python int, else at run time."""
    if isinstance(tiles_before, int):
        if tiles_before >= slots:
            fn()
        return
    pl.when(tiles_before >= slots)(fn)


def release_slot(ring_free, t: int, num_tiles: int, read_by_thread: bool, stages: int = STAGES,
                 ring_offset=0, tiles_after=0) -> None:
    """A consumer is done with tile t's slot (of `stages`): let the producer refill it, if it will.

    read_by_thread: the slot was also read by ordinary loads (not only by wgmma), so those
    reads are ordered before the producer's next TMA write with a proxy fence.
    ring_offset, tiles_after: in a persistent kernel, the tiles the ring carried before this
    work item's first (stream_channel_tiles), and those it will carry after its last (traced):
    the producer refills the slot if tile t + stages is among them.
    """

    def release():
        if read_by_thread:
            plgpu.commit_smem()
        plgpu.barrier_arrive(ring_free.at[ring_slot(ring_offset, t, stages)])

    if t + stages < num_tiles:
        release()
    elif not isinstance(tiles_after, int):
        pl.when(t + stages < num_tiles + tiles_after)(release)


def scores(q_tiles, k_tiles, rows: int, keys: int) -> jax.Array:
    """Q·Kᵀ (rows, keys) in float32 with wgmma, summed over the 64-channel tiles."""

    def run(acc):
        for q_tile, k_tile in zip(q_tiles, k_tiles):
            plgpu.wgmma(acc, q_tile, k_tile.transpose((1, 0)))
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC((rows, keys), jnp.float32))


def live_mask(strips: MosaicStrips, query_base, shape, key_base=0) -> jax.Array:
    """True where (query, key) is a real pair of the strip: both inside it, and (column pass)
    not the pixel itself, which the row pass counts. Rows of `shape` are queries from
    `query_base`, columns keys from `key_base`."""
    keys = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + key_base
    queries = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + query_base
    live = (keys < strips.length) & (queries < strips.length)
    if strips.mask_diagonal:
        live = live & (keys != queries)
    return live


def log_add_exp(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(exp(a) + exp(b)), written out (jnp.logaddexp is a custom_jvp, which Mosaic cannot lower)."""
    top = jnp.maximum(a, b)
    return top + jnp.log(jnp.exp(a - top) + jnp.exp(b - top))


def exp_of_difference(x: jax.Array, y: jax.Array) -> jax.Array:
    """exp(x - y) elementwise (y broadcast to x's shape), as exp2((x - y)·log2(e)).

    jnp.exp lowers to libdevice's expf, whose range reduction takes about
    eight instructions beside the special-function unit's ex2; this takes a
    subtraction, a multiplication and the ex2. The softmax takes one per
    score, so it is most of the instructions a score costs. Rounding
    (x - y)·log2(e) errs by about |x - y|·2^-23 relative, large only where
    the weight is small (|x - y| = 16: e^-16). The difference comes first:
    x·log2(e) - y·log2(e), one FMA, overflows at MASK_VALUE (-0.7 of
    float32's largest), which a fully masked row has in both.
    """
    return jnp.exp2((x - y) * _LOG2_E)


def per_query(x: jax.Array, shape) -> jax.Array:
    """A per-query vector broadcast along the columns of a (queries, ·) tile."""
    return jax.lax.broadcast_in_dim(x, shape, [0])
