"""How the Triton kernels multiply tiles, float32 ones included.

16-bit tiles multiply as they are, with float32 accumulation. float32 tiles
take one of CrissCrossConfig.float32_dot's modes: a dot algorithm that
Triton or jax's lowering expands ("bf16x6", "tf32x3", "tf32", "ieee"), or
"f16x3", which this module writes out itself:

    x = (hi + lo) / scale,  hi = f16(x·scale),  lo = f16(x·scale - hi),

with `scale` a power of two that puts the tile's largest magnitude in
[2^13, 2^14): at most a quarter of float16's largest value (65504), so no
rounding overflows, and high enough that `lo` keeps its 11 bits for every
element down to 2^-16 of the largest (smaller ones keep float16's smallest
step, 2^-24 after scaling: an error of 2^-37 of the tile's largest, far
below float32's tolerance). A tile whose largest magnitude is below 2^-113
takes the scale of 2^-113, which keeps scale and unscale normal float32
numbers; its values then sit lower in float16's range. Then
    a·b = (a_lo·b_hi + a_hi·b_lo + a_hi·b_hi) / (scale_a·scale_b),
dropping a_lo·b_lo, 2^-22 relative: three float16 products (exact in
float32, accumulated in float32) where "bf16x6" takes six from three
bfloat16 parts. Without the scale, inputs of magnitude 1e-3 lose `lo` to
float16's subnormals (1e-1 relative error in dq and dk, emulated).
Probabilities P lie in [0, 1] and take the fixed scale 2^13 without a
reduction. The Mosaic float32 kernels take the same pairs, with one scale
per image of a map (so that an image's accuracy and results do not depend
on the others in its batch): q and k split by `split_images` in XLA, v and
dO split tile by tile in shared memory with `split_scaled` and each image's
`largest_scales` (mosaic_split); they split P and dS in registers.

The scale comes from the exponent bits of the tile's largest finite
magnitude, so it is exact and needs no log or exp: a zero tile takes a
finite scale, and an inf or NaN element comes out of the split non-finite
without changing how its tile's finite elements are split.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.criss_cross.config import FLOAT32_DOT_PRECISIONS, CrissCrossConfig

# The tile's largest magnitude lands in [2^TOP_EXPONENT, 2^(TOP_EXPONENT + 1)) after scaling.
TOP_EXPONENT = 13
# The unscale of a unit-interval split (probabilities, scaled by 2^13 without a reduction).
UNIT_UNSCALE = 2.0**-TOP_EXPONENT
_MANTISSA_BITS = 23
_BIAS = 127
# Biased float32 exponents of the largest magnitude that keep both scale and 1/scale normal.
_LOWEST, _HIGHEST = TOP_EXPONENT + 1, 2 * _BIAS


@dataclasses.dataclass(frozen=True)
class Pair:
    """A float32 tile as float16 parts: tile ≈ (hi + lo) * unscale."""

    hi: jax.Array
    lo: jax.Array
    unscale: jax.Array  # float32 scalar, a power of two


def _power_of_two(biased_exponent: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(biased_exponent << _MANTISSA_BITS, jnp.float32)


def _finite_magnitude(x: jax.Array) -> jax.Array:
    magnitude = jnp.abs(x)
    return jnp.where(magnitude < jnp.inf, magnitude, 0.0)  # NaN and inf: non-finite after the split anyway


def _scales(top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scale, unscale), powers of two, that take largest magnitudes `top` into [2^13, 2^14)."""
    exponent = (jax.lax.bitcast_convert_type(top, jnp.int32) >> _MANTISSA_BITS) & 0xFF
    exponent = jnp.clip(exponent, _LOWEST, _HIGHEST)
    # top = 2^(e - 127)·m with m in [1, 2); scale = 2^(13 - (e - 127)), 1/scale = 2^((e - 127) - 13).
    return _power_of_two(2 * _BIAS + TOP_EXPONENT - exponent), _power_of_two(exponent - TOP_EXPONENT)


def split_scaled(x: jax.Array, scale, unscale=None) -> Pair:
    """float32 `x` as a `Pair` under a given power-of-two `scale` (`unscale`, its inverse, is only
    carried along)."""
    scaled = x * scale
    hi = scaled.astype(jnp.float16)
    lo = (scaled - hi.astype(jnp.float32)).astype(jnp.float16)
    return Pair(hi, lo, unscale)


def largest_scales(x: jax.Array, *, per_image: bool = False) -> tuple[jax.Array, jax.Array]:
    """(scale, unscale) of float32 `x` (any rank >= 1) from its largest finite magnitude: scalars,
    or with `per_image` one of each per index of the leading axis, shaped (B,)."""
    top = _finite_magnitude(x)
    while top.ndim > per_image:  # one axis at a time (Triton reduces one axis per op)
        top = jnp.max(top, axis=-1)
    return _scales(top)


def split(x: jax.Array, *, unit_interval: bool = False) -> Pair:
    """float32 `x` (any rank >= 1) as a `Pair`, scaled by its largest magnitude, or by 2^13 where
    the caller knows every value lies in [0, 1]."""
    if unit_interval:
        return split_scaled(x, jnp.float32(2.0**TOP_EXPONENT), jnp.float32(UNIT_UNSCALE))
    return split_scaled(x, *largest_scales(x))


def split_images(x: jax.Array) -> Pair:
    """float32 (B, ...) `x` as a `Pair` with one scale per image (per index of the leading axis):
    the pair's `unscale` is (B,)."""
    scale, unscale = largest_scales(x, per_image=True)
    return split_scaled(x, scale.reshape((-1,) + (1,) * (x.ndim - 1)), unscale)


def split_rows(blocks: list[jax.Array]) -> list[Pair]:
    """Column blocks of one float32 2-D array, each as a `Pair`, with one scale per row over all
    blocks (the Mosaic backward's dS, whose products sum within a row): each Pair's `unscale` is
    the same (rows,) vector."""
    top = functools.reduce(jnp.maximum, [jnp.max(_finite_magnitude(x), axis=1) for x in blocks])
    scale, unscale = _scales(top)
    # Mosaic's layouts broadcast a row vector only through broadcast_in_dim.
    scale = jax.lax.broadcast_in_dim(scale, blocks[0].shape, [0])
    return [split_scaled(x, scale, unscale) for x in blocks]


def _dot(a, b, trans_a: bool, trans_b: bool, precision=None):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def pair_dot(a: Pair, b: Pair, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b (float32) from three float16 products, the smallest first."""
    acc = _dot(a.lo, b.hi, trans_a, trans_b)
    acc = acc + _dot(a.hi, b.lo, trans_a, trans_b)
    acc = acc + _dot(a.hi, b.hi, trans_a, trans_b)
    # One factor at a time: the product of two extreme unscales could leave float32's range.
    return acc * a.unscale * b.unscale


@dataclasses.dataclass(frozen=True)
class TileProducts:
    """A kernel's tile multiplication: `operand` prepares a tile once (for f16x3, its split,
    reused by every product it enters), `dot` multiplies two prepared tiles in float32."""

    pairs: bool
    precision: jax.lax.Precision | jax.lax.DotAlgorithmPreset | None = None

    def operand(self, x: jax.Array, *, dtype=None, unit_interval: bool = False):
        """`x` ready for `dot`; `dtype` (16-bit kernels) casts it, as P and dS are cast to the
        inputs' dtype before their products."""
        if self.pairs:
            return split(x, unit_interval=unit_interval)
        return x if dtype is None else x.astype(dtype)

    def dot(self, a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
        """a @ b with optional transposes, float32 accumulation."""
        if self.pairs:
            return pair_dot(a, b, trans_a=trans_a, trans_b=trans_b)
        return _dot(a, b, trans_a, trans_b, self.precision)


def tile_products(dtype, config: CrissCrossConfig, interpret: bool) -> TileProducts:
    """How the kernels multiply tiles of `dtype` under `config`. The interpreter (the CPU's dot has
    no TF32 or split-bfloat16 algorithms) multiplies float32 exactly, except f16x3, which splits
    there too, so that the CPU checks the split."""
    if jnp.dtype(dtype) != jnp.float32:
        return TileProducts(pairs=False, precision=jax.lax.Precision.DEFAULT)
    if config.float32_dot == "f16x3":
        return TileProducts(pairs=True)
    if interpret:
        return TileProducts(pairs=False, precision=jax.lax.Precision.HIGHEST)
    return TileProducts(pairs=False, precision=FLOAT32_DOT_PRECISIONS[config.float32_dot])
