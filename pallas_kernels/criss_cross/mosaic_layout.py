"""How the Mosaic GPU kernels see the map: NHWC arrays, strips, and tiles.

The Hopper kernels move data with TMA and multiply with wgmma, which fixes
their granules:
- channels in tiles of 64 (one 128-byte swizzled row of 16-bit values), so
  channel counts are padded to multiples of 64 (CCNet's 64 and 512 are not);
- a warpgroup's wgmma covers 64 queries, and a strip's keys are padded to a
  multiple of 64 (the contraction of P·V); up to 256 keys fit one wgmma.
A TMA box that runs past the end of the array reads zeros and writes
nothing, so a strip of any length needs no padding in global memory; the
kernels mask keys past its end and discard those queries.

wgmma reads its shared-memory operands as (8, 64) tiles with the 128-byte
swizzle. Mosaic GPU builds a tiled TMA descriptor over the whole array, which
it refuses unless H and W are multiples of 8 (97 is not). But a tile is 8
rows of 64 channels, so a (positions, 64) buffer of tiles holds the same
bytes as the same buffer of swizzled rows: TMA fills and drains the buffer
as rows (no constraint on H and W) and wgmma reads it as tiles, through two
views of one allocation (`tile_buffer`). jax documents RefUnion members as
not to be read through another view than the one that wrote them, and its
Mosaic GPU interpreter keeps them in separate buffers and refuses such reads;
it does take tiled copies at any H and W, so under it the kernels copy tiles.
tests/test_attention_mosaic.py pins the layout this relies on (both views at
offset 0, the tiled one in row order) and a GPU test compares the two paths
bit for bit. `MosaicConfig(pad_positions=True)` pads H and W to
multiples of 8 instead (an XLA copy of every input and output) and copies
tiles.
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
SWIZZLE_BYTES = 128  # one row of a channel tile
QUERY_BLOCK = 64
POSITION_ALIGN = 8
MAX_STRIP = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma's operands; float32 as float16 pairs
# float32 tiles of a 64-channel tile: a 128-byte swizzled row holds 32 float32 values.
FLOAT32_PIECE = SWIZZLE_BYTES // 4


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def smem_transforms(dtype=jnp.bfloat16) -> tuple:
    """Tiling and swizzle of a shared-memory tile that wgmma or the registers read: (8, 64) for
    16-bit values, (8, 32) for float32 ones (one 128-byte swizzled row either way)."""
    return (plgpu.TilingTransform((8, SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(SWIZZLE_BYTES))


@dataclasses.dataclass(frozen=True)
class MosaicStrips(StripGeometry):
    """One direction's strips of a (B, H, W, ·) problem, as the Mosaic kernels tile them.

    max_query_warpgroups: at most this many 64-query (or, in the key-side
    backward, 64-key) warpgroups per CTA. The one-CTA backward needs the whole
    strip of up to 128 pixels in one CTA, so it keeps the default 2.
    row_tma: TMA moves swizzled rows into and out of `tile_buffer`s (any H
      and W); otherwise tiles (H and W multiples of 8, or the interpreter).
    """

    max_query_warpgroups: int = 2
    row_tma: bool = False

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

    @property
    def stats_length(self) -> int:
        """Pixels along a strip of the per-pixel float32 arrays (lse, delta): as far as the CTAs'
        64-pixel copies of them reach, a multiple of 64. On an H100 such a copy that ran past the
        end of a shorter row was not clipped there: it wrote into the next strip's row (seen
        2026-11-27 with experiments/mosaic_diagnose.py; the Mosaic GPU interpreter clips it)."""
        return self.query_blocks * self.query_warpgroups * QUERY_BLOCK

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
    time from the warpgroup's index "wg", which every kernel names its thread
    axis, persistent or not (one integer multiply-add).
    """
    return pl.ds(lax.axis_index("wg") * 0 + start, size)


def tile_buffer(shape: tuple[int, ...], dtype, row_tma: bool):
    """A shared-memory buffer of (positions, 64)-channel tiles (float32: (positions, 32)) that TMA
    fills or drains and wgmma (or the registers) reads: the tiled view alone, or with `row_tma` a
    union of the swizzled-row view and the tiled view over the same bytes. Split it with
    `tma_and_tiles`."""
    tiled = plgpu.SMEM(shape, dtype, transforms=smem_transforms(dtype))
    if not row_tma:
        return tiled
    return plgpu.RefUnion(plgpu.SMEM(shape, dtype, transforms=(plgpu.SwizzleTransform(SWIZZLE_BYTES),)), tiled)


def tma_and_tiles(buffer, row_tma: bool) -> tuple:
    """(the view TMA copies use, the tiled view wgmma and the registers use) of a `tile_buffer`
    as the kernel body receives it; both take the same indices."""
    if not row_tma:
        return buffer, buffer
    rows, tiles = buffer
    return rows, tiles


def map_pads(shape: tuple[int, ...], positions: bool) -> tuple | None:
    """The jnp.pad widths that take an NHWC `shape`'s C to a multiple of 64 and, if `positions`,
    H and W to multiples of 8; None when it needs none."""
    _, h, w, c = shape
    hp, wp = (round_up(h, POSITION_ALIGN), round_up(w, POSITION_ALIGN)) if positions else (h, w)
    pads = ((0, 0), (0, hp - h), (0, wp - w), (0, round_up(c, CHANNEL_TILE) - c))
    return None if all(after == 0 for _, after in pads) else pads


def pad_map(x: jax.Array, positions: bool) -> jax.Array:
    """NHWC `x` padded with zeros as `map_pads` says; `x` itself when nothing needs padding."""
    pads = map_pads(x.shape, positions)
    return x if pads is None else jnp.pad(x, pads)


def interpret_params(interpret: bool):
    """The Mosaic GPU interpreter (race detection on) when `interpret`, else compile for the GPU."""
    return plgpu.InterpretGPUParams(detect_races=True) if interpret else False


def launch(body, operands, out_type, *, in_place=(), **kernel_args) -> tuple:
    """`plgpu.kernel(body, out_type=out_type, **kernel_args)` on `operands` and `in_place`.

    `in_place` are arrays the kernel adds to and overwrites (the other
    direction's result): the body gets their refs after the operands' and
    before the outputs', reads each tile of them before writing it, and XLA
    aliases them to the kernel's results, so the sum takes no second buffer
    (38.5 MB for a float32 dV at (2, 97, 97, 64, 512)). They must not be used
    after the call. Returns (*in_place's new values, *outputs).

    The call is one `pl.run_state` over refs of `in_place` and of zeroed
    buffers for `out_type` (so keep other outputs small): a pure function to
    jax's transformations, which `jax.checkpoint` recomputes like any other.
    (Refs made with `jax.new_ref` are effects: under `jax.checkpoint` the
    kernel's outputs were saved instead.) run_state has no batching rule, so
    under `jax.vmap` the mapped axis becomes a leading grid axis, as
    `plgpu.kernel` itself does.
    """
    if not in_place:
        return plgpu.kernel(body, out_type=tuple(out_type), **kernel_args)(*operands)
    if not isinstance(kernel_args.get("scratch_types", {}), dict):
        # The vmap rule below takes every positional ref for an operand, in-place array or output.
        raise TypeError("launch: pass scratch_types as a dict, so that the body takes scratch by name")

    @jax.custom_batching.custom_vmap
    def call(operands, in_place):
        kernel = plgpu.kernel(body, out_type=(), **kernel_args)

        def stateful(refs):
            kernel(*operands, *refs)

        return tuple(pl.run_state(stateful)((*in_place, *(jnp.zeros(t.shape, t.dtype) for t in out_type))))

    @call.def_vmap
    def _batched(axis_size, in_batched, operands, in_place):
        operands_batched, in_place_batched = in_batched
        in_place = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                    for x, batched in zip(in_place, in_place_batched)]
        axis = f"vmap{len(kernel_args.get('grid', ()))}"

        def batched_body(*refs, **scratch):
            index = lax.axis_index(axis)
            refs = [ref.at[index] if batched else ref
                    for ref, batched in zip(refs, [*operands_batched] + [True] * (len(refs) - len(operands)))]
            return body(*refs, **scratch)

        args = dict(kernel_args, grid=(axis_size, *kernel_args.get("grid", ())),
                    grid_names=(axis, *kernel_args.get("grid_names", ())))
        types = [jax.ShapeDtypeStruct((axis_size, *t.shape), t.dtype) for t in out_type]
        results = launch(batched_body, operands, types, in_place=in_place, **args)
        return results, (True,) * len(results)

    return call(tuple(operands), tuple(in_place))
