"""How the kernels see the map: rows and columns as "strips" of pixels.

The row part of criss-cross attention is ordinary attention inside each row
(length W); the column part is attention inside each column (length H) with
the query pixel itself masked. Both run the same kernels; only the BlockSpecs
differ, selecting a row (b, i, :, :) or a column (b, :, j, :) of an NHWC
array. The kernels then see 2D (pixels, channels) blocks.

Grids are (B, strip, block, [channel tile]): `strip` walks rows (i) or
columns (j), `block` walks blocks of pixels along the strip.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.criss_cross.config import padded_channels

Direction = Literal["row", "col"]

@dataclasses.dataclass(frozen=True)
class StripGeometry:
    """Sizes of one direction's strips for a (B, H, W, ·) problem."""

    direction: Direction
    batch: int
    height: int
    width: int

    @property
    def num_strips(self) -> int:
        return self.height if self.direction == "row" else self.width

    @property
    def length(self) -> int:
        return self.width if self.direction == "row" else self.height

    @property
    def mask_diagonal(self) -> bool:
        # The pixel itself is counted once, in the row part.
        return self.direction == "col"

    def num_blocks(self, block: int) -> int:
        return pl.cdiv(self.length, block)

    def padded_length(self, block: int) -> int:
        return self.num_blocks(block) * block

    def pixels(self, block: int, channels: int, index_map) -> pl.BlockSpec:
        """Spec of an NHWC array: `block` pixels of a strip by `channels` channels.

        `index_map(*grid) -> (b, strip, pixel_block, channel_block)`.
        """
        if self.direction == "row":
            return pl.BlockSpec((None, None, block, channels), index_map)

        def spec_index(*grid):
            b, s, t, c = index_map(*grid)
            return b, t, s, c

        return pl.BlockSpec((None, block, None, channels), spec_index)

    def scalars(self, block: int, index_map) -> pl.BlockSpec:
        """Spec of a per-pixel (B, H, W) array; `index_map(*grid) -> (b, strip, pixel_block)`."""
        if self.direction == "row":
            return pl.BlockSpec((None, None, block), index_map)

        def spec_index(*grid):
            b, s, t = index_map(*grid)
            return b, t, s

        return pl.BlockSpec((None, block, None), spec_index)

    def partials(self, block: int, channels: int, index_map) -> pl.BlockSpec:
        """Spec of a (P, B, H, W, C) array of partial sums; `index_map -> (part, b, strip)`."""
        if self.direction == "row":

            def spec_index(*grid):
                p, b, s = index_map(*grid)
                return p, b, s, 0, 0

            return pl.BlockSpec((None, None, None, block, channels), spec_index)

        def spec_index(*grid):
            p, b, s = index_map(*grid)
            return p, b, 0, s, 0

        return pl.BlockSpec((None, None, block, None, channels), spec_index)


def channel_blocks(cqk: int, cv: int, block_cv: int) -> tuple[int, int, int]:
    """(padded Cqk, Cv tile, number of Cv tiles)."""
    cqk_p = padded_channels(cqk)
    tile = min(block_cv, padded_channels(cv))
    return cqk_p, tile, pl.cdiv(cv, tile)


def positions(block_index, block: int):
    """Positions along the strip of the pixels of block `block_index`."""
    return block_index * block + jnp.arange(block, dtype=jnp.int32)


def channel_tile(position, num_tiles: int, last_first: bool):
    """The Cv tile that a program at `position` along the grid's channel axis takes: the same
    index, or with `last_first` counting from the last tile."""
    return num_tiles - 1 - position if last_first else position


def live_scores(q_pos, k_pos, length: int, mask_diagonal: bool):
    """(bq, bk) mask of the energies that take part in the softmax."""
    live = (q_pos[:, None] < length) & (k_pos[None, :] < length)
    if mask_diagonal:
        live = live & (q_pos[:, None] != k_pos[None, :])
    return live


def written_over(previous: jax.Array | None, out_dtype, operand: int, output: int = 0) -> dict[int, int]:
    """`pallas_call`'s input_output_aliases that give output `output` the buffer of operand `operand`,
    the other direction's result `previous`, where their dtypes agree (else none). Safe where the
    two share a BlockSpec: each program reads its block of `previous` before writing the same block."""
    if previous is None or previous.dtype != jnp.dtype(out_dtype):
        return {}
    return {operand: output}
