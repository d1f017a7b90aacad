"""float32 channel tiles split into float16 pairs in shared memory, where they land.

The Mosaic float32 kernels multiply float16 pairs (tile_products: x ≈ (hi +
lo) / scale, three wgmmas a product). XLA used to split the big maps, V and
dO, before the kernels: a pass that read each map and wrote its pair, and the
pairs stayed allocated through the backward (77 MB at (2, 97, 97, 64, 512)).
Now TMA brings the float32 tile itself, and the producer warpgroup splits it
in place before the compute warpgroup multiplies it.

In place: a (positions, 64) float32 tile takes as many bytes as its float16
hi and lo tiles, (positions, 64) each. TMA fills the float32 tile as two
32-channel pieces (a 128-byte swizzled row a position each); the producer
loads 64 positions of both pieces into registers (32 values a thread), waits
for its warpgroup, joins each part's pieces and writes hi and lo over them,
as the same (8, 64) tiles with the 128-byte swizzle that XLA's pairs had, so
the products are unchanged. The scale is the image's (one power of two
from its largest magnitude, which XLA finds in a reduction that writes
nothing), so a product's unscale stays one constant within a CTA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.criss_cross.mosaic_layout import (
    CHANNEL_TILE,
    FLOAT32_PIECE,
    SWIZZLE_BYTES,
    MosaicStrips,
    box,
    smem_transforms,
)
from pallas_kernels.criss_cross.tile_products import largest_scales, split_scaled

PIECES = CHANNEL_TILE // FLOAT32_PIECE  # float32 pieces of a 64-channel tile
ROW_BLOCK = 64  # positions split at a time: the rows of one wgmma-layout array
_FLOAT32_TRANSFORMS = (plgpu.TilingTransform((8, FLOAT32_PIECE)), plgpu.SwizzleTransform(SWIZZLE_BYTES))


def split_buffers(slots: int, positions: int, row_tma: bool, aliased: bool = True):
    """Shared memory for a ring of `slots` 64-channel float32 tiles of `positions` rows, each split
    in place: the float32 view TMA fills (swizzled rows with `row_tma`, else tiles), the tiled
    float32 view the registers read, and the float16 pairs' view, over the same bytes.

    `aliased=False` (the Mosaic GPU interpreter) keeps the float32 tiles and the pairs apart:
    the interpreter checks that no `RefUnion` is read through another view than the one that
    last wrote it, over the whole union, so a ring in one union (TMA filling one slot while
    wgmma reads another) would be reported. Open it with `SplitRing.of`."""
    f32 = plgpu.SMEM((slots, PIECES, positions, FLOAT32_PIECE), jnp.float32, transforms=_FLOAT32_TRANSFORMS)
    pairs = plgpu.SMEM((slots, 2, positions, CHANNEL_TILE), jnp.float16, transforms=smem_transforms(jnp.float16))
    if not aliased:
        return f32, pairs
    views = [f32, pairs]
    if row_tma:
        views.insert(0, plgpu.SMEM(f32.shape, jnp.float32, transforms=(plgpu.SwizzleTransform(SWIZZLE_BYTES),)))
    return plgpu.RefUnion(*views)


@dataclasses.dataclass(frozen=True)
class SplitRing:
    """The views of `split_buffers`, indexed by slot."""

    tma: object  # float32 (slots, PIECES, positions, 32): TMA's destination
    tiles: object  # float32, the same bytes as tiles: what the registers read
    pairs: object  # float16 (slots, 2, positions, 64): hi (0) and lo (1) after the split

    @classmethod
    def of(cls, buffers, row_tma: bool) -> SplitRing:
        """The views, as the kernel body receives `split_buffers`."""
        if row_tma:
            return cls(*buffers)
        tiles, pairs = buffers
        return cls(tiles, tiles, pairs)

    @property
    def slots(self) -> int:
        return self.tma.shape[0]

    @property
    def positions(self) -> int:
        return self.tma.shape[-2]

    def load(self, strips: MosaicStrips, ref, b, s, positions: pl.Slice, tile, slot, barrier) -> None:
        """TMA 64-channel tile `tile` of `positions` of strip s of the float32 NHWC `ref` into
        `slot`, a copy (and an arrival on `barrier`) per piece."""
        for piece in range(PIECES):
            channels = box(tile * CHANNEL_TILE + piece * FLOAT32_PIECE, FLOAT32_PIECE)
            plgpu.copy_gmem_to_smem(strips.view(ref, b, s, positions, channels), self.tma.at[slot, piece], barrier)

    def split(self, slot, scale) -> None:
        """Split `slot`'s float32 tile into its float16 pair in place (the whole warpgroup, after
        the tile's copies have landed); ends with the proxy fence that wgmma needs.

        hi's row r takes the bytes of piece 0's row r, lo's those of piece 1's, so 64 rows at a
        time can go: each block's pieces are read, all of them, before its hi and lo rows are
        written (32 values a thread held at once)."""
        for start in range(0, self.positions, ROW_BLOCK):
            rows = pl.ds(start, ROW_BLOCK)
            pieces = [split_scaled(plgpu.load(self.tiles.at[slot, piece, rows], layout=plgpu.Layout.WGMMA), scale)
                      for piece in range(PIECES)]
            plgpu.commit_smem()  # every thread holds its values before any writes over them
            self.pairs.at[slot, 0, rows][...] = jnp.concatenate([pair.hi for pair in pieces], axis=1)
            self.pairs.at[slot, 1, rows][...] = jnp.concatenate([pair.lo for pair in pieces], axis=1)
        plgpu.commit_smem()

    def part(self, slot, part: int):
        """The float16 (positions, 64) tile of one part of `slot`'s pair: 0 hi, 1 lo."""
        return self.pairs.at[slot, part]


def produce_split_tiles(num_tiles: int, stages: int, issue, loaded, ready, rings, scales,
                        issue_first: bool = False) -> None:
    """A producer warpgroup's loop over tiles 0 ... num_tiles - 1 of float32 rings it splits.

    issue(t): waits, if it must, for tile t's slot (t % stages) to be free and issues its
      copies onto loaded[slot] (which counts them);
    rings: the SplitRings the tiles fill;
    scales(): each ring's scale, called once, after the first tiles are issued and before the
      first split (it may wait for them to arrive).
    Step t splits tile t - (stages - 1), once its copies land, then ready[slot] takes one
    arrival, which the compute warpgroup waits for; and it issues tile t.

    issue_first: issue before splitting in each step, so that stages - 1 tiles' copies are in
      flight during a split (else stages - 2). Only for a compute warpgroup that frees each
      tile's slot once done with that tile: the query side frees tile t - 1's only after
      issuing tile t's products, and issuing first would then wait for a split not yet done.
    """
    if stages < 2:
        raise ValueError(f"produce_split_tiles: a ring of {stages} slot cannot hold a tile while it splits another")
    lag = stages - 1
    ring_scales = None

    def split(t: int) -> None:
        nonlocal ring_scales
        slot = t % stages
        if ring_scales is None:
            ring_scales = scales()
        plgpu.barrier_wait(loaded.at[slot])
        for ring, scale in zip(rings, ring_scales):
            ring.split(slot, scale)
        plgpu.barrier_arrive(ready.at[slot])

    for t in range(num_tiles + lag):
        if issue_first and t < num_tiles:
            issue(t)
        if t >= lag:
            split(t - lag)
        if not issue_first and t < num_tiles:
            issue(t)


def map_scales(x: jax.Array) -> jax.Array:
    """(scale, unscale) of each image of a float32 (B, H, W, C) map, a (B, 2) float32 array, as
    tile_products.split_images takes them."""
    return jnp.stack(largest_scales(x, per_image=True), axis=-1)
