"""How the Mosaic GPU kernels see the map: padded NHWC arrays, strips, and tiles.

The Hopper kernels move data with TMA and multiply with wgmma, which fixes
their granules:
- channels in tiles of 64 (one 128-byte swizzled row of 16-bit values), so
  channel counts are padded to multiples of 64 (CCNet's 64 and 512 are not);
- TMA copies into tiled shared memory need the strip's position dimension of
  the global array to be a multiple of 8, so H and W are padded to multiples
  of 8 (97 -> 104);
- a warpgroup's wgmma covers 64 queries, and a strip's keys are padded to a
  multiple of 64 (the contraction of P·V); up to 256 keys fit one wgmma.
A TMA box that runs past the end of the array reads zeros and writes
nothing, so the 64-row blocks of a 104-pixel strip need no further padding.
Padded positions are masked as keys and their query rows are discarded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.criss_cross.strips import StripGeometry

CHANNEL_TILE = 64
QUERY_BLOCK = 64
POSITION_ALIGN = 8
MAX_STRIP = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def smem_transforms() -> tuple:
    """Tiling and swizzle of every 16-bit shared-memory tile fed to TMA and wgmma."""
    return plgpu.TilingTransform((8, CHANNEL_TILE)), plgpu.SwizzleTransform(128)


@dataclasses.dataclass(frozen=True)
class MosaicStrips(StripGeometry):
    """One direction's strips of a (B, H, W, ·) problem, as the Mosaic kernels tile them.

    max_query_warpgroups: at most this many 64-query (or, in the key-side
    backward, 64-key) warpgroups per CTA. The one-CTA backward needs the whole
    strip of up to 128 pixels in one CTA, so it keeps the default 2.
    """

    max_query_warpgroups: int = 2

    @property
    def aligned_length(self) -> int:
        """Pixels along a strip in the padded global arrays (a multiple of 8)."""
        return round_up(self.length, POSITION_ALIGN)

    @property
    def keys(self) -> int:
        """Keys of a strip as the kernels hold them (a multiple of 64, zero beyond the array)."""
        return round_up(self.length, QUERY_BLOCK)

    @property
    def query_warpgroups(self) -> int:
        """Warpgroups of 64 queries each that one CTA runs (1 or 2)."""
        return min(self.max_query_warpgroups, self.keys // QUERY_BLOCK)

    @property
    def query_blocks(self) -> int:
        """CTAs per strip: each takes 64 x query_warpgroups consecutive queries."""
        return -(-self.keys // (QUERY_BLOCK * self.query_warpgroups))

    def view(self, ref, b, s, positions: pl.Slice, channels: pl.Slice):
        """(positions, channels) of strip `s` of image `b` of an NHWC ref."""
        if self.direction == "row":
            return ref.at[b, s, positions, channels]
        return ref.at[b, positions, s, channels]


def box(start, size: int) -> pl.Slice:
    """`size` pixels from `start` along a strip, for a TMA copy that may run past the array's end.

    TMA reads zeros there and writes nothing, which the kernels rely on; the
    ref indexer, though, rejects static slices that end past the array, and a
    constant start is folded back into one. So the start is computed at run
    time from the kernels' grid index "b" (one integer multiply-add).
    """
    return pl.ds(lax.axis_index("b") * 0 + start, size)


def padded_shape(h: int, w: int) -> tuple[int, int]:
    return round_up(h, POSITION_ALIGN), round_up(w, POSITION_ALIGN)


def pad_map(x: jax.Array) -> jax.Array:
    """NHWC `x` with H and W padded to multiples of 8 and C to a multiple of 64 (zeros)."""
    _, h, w, c = x.shape
    hp, wp = padded_shape(h, w)
    pads = ((0, 0), (0, hp - h), (0, wp - w), (0, round_up(c, CHANNEL_TILE) - c))
    if all(after == 0 for _, after in pads):
        return x
    return jnp.pad(x, pads)


def interpret_params(interpret: bool):
    """The Mosaic GPU interpreter (race detection on) when `interpret`, else compile for the GPU."""
    return plgpu.InterpretGPUParams(detect_races=True) if interpret else False
