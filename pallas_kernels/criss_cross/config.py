"""Block sizes and launch parameters of the criss-cross attention kernels."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.criss_cross.gpu_targets import HOPPER, SHARED_MEMORY_PER_BLOCK

# Per-block shared memory of an H100 (sm_90), the card the defaults were first sized for.
H100_SHARED_MEMORY_BYTES = SHARED_MEMORY_PER_BLOCK[HOPPER]
MIN_DOT_DIM = 16  # Triton's tl.dot needs every dimension >= 16.
# How float32 tiles or operands may be multiplied, by name (CrissCrossConfig.float32_dot).
FLOAT32_DOT_PRECISIONS = {
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "bf16x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "ieee": jax.lax.Precision.HIGHEST,
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
}
# "f16x3" is no dot algorithm: the kernels split float32 tiles into scaled float16 pairs themselves
# (tile_products).
FLOAT32_DOTS = (*FLOAT32_DOT_PRECISIONS, "f16x3")


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_int(value) -> bool:
    # Not bool: True would pass as 1. numpy integers (from a shape) are welcome.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_power_of_two(n: int) -> bool:
    return _is_int(n) and n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class CrissCrossConfig:
    """Tiling of the criss-cross kernels.

    A "strip" is one row (length W) or one column (length H) of the map. The
    forward and the backward kernels walk a strip in query blocks of
    `block_q` pixels and key blocks of `block_k` pixels, and tile the value
    channels Cv by `block_cv` (forward and dV grids) and by `bwd_block_cv`
    (the dK/dQ kernel's inner dP = dO·Vᵀ loop, which holds the most live
    tiles). `dkq_block_k` (None: `block_k`) is the dK/dQ kernel's own key
    block, which holds the most live tiles. All are powers of two >= 16
    (Triton).

    float32_dot: how float32 tiles are multiplied on a GPU (the interpreter
    multiplies exactly): "bf16x6" (the default; three bfloat16 parts per
    tile, six part products summed in float32, within 3e-6 of exact float32
    xla), "tf32x3" (three TF32 products, as accurate; 12% slower
    forward+backward than bf16x6 at (2, 97, 97, 64, 512) on an H100), "ieee"
    (exact float32 on the FMA units; the choice on GPUs without bfloat16
    tensor cores, before Ampere) or "tf32" (one TF32 product, about 1e-3
    relative error), or "f16x3" (two float16 parts per tile, scaled by a
    power of two from the tile's largest magnitude, three part products:
    half of bf16x6's products from two thirds of its parts; emulated 1.2e-6
    from the float64 result where bf16x6 gave 9e-7, within the float32
    tolerance by 4x; not yet timed on a GPU).

    alternate_cv_order: the second direction's forward and dV kernels take
    the Cv tiles from the last (the default) where the first direction's
    took them from the first. Triton launches the Cv tiles slowest, so each
    second kernel starts on the tiles (of V or dO, which the kernel before
    it read last, and of the first direction's result, which it wrote
    last) that L2 may still hold. Under jax.vmap the mapped axis is
    launched slowest instead, and the reuse holds only between the last
    tiles of each mapped slice. The results are the same to the bit.
    """

    block_q: int = 64
    block_k: int = 64
    block_cv: int = 128
    bwd_block_cv: int = 128
    dkq_block_k: int | None = None
    fwd_num_warps: int = 4
    fwd_num_stages: int = 2
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2
    float32_dot: Literal["tf32x3", "bf16x6", "ieee", "tf32", "f16x3"] = "bf16x6"
    alternate_cv_order: bool = True

    @property
    def dkq_key_block(self) -> int:
        return self.block_k if self.dkq_block_k is None else self.dkq_block_k

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_cv", "bwd_block_cv", "dkq_block_k"):
            value = getattr(self, name)
            if value is None and name == "dkq_block_k":
                continue
            if not _is_power_of_two(value) or value < MIN_DOT_DIM:
                raise ValueError(
                    f"CrissCrossConfig.{name}={value!r}: must be a power of two >= {MIN_DOT_DIM} "
                    "(Triton dot and block shapes)."
                )
        for name in ("fwd_num_warps", "bwd_num_warps"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value > 16:
                raise ValueError(f"CrissCrossConfig.{name}={value!r}: must be 1, 2, 4, 8 or 16.")
        for name in ("fwd_num_stages", "bwd_num_stages"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"CrissCrossConfig.{name} must be >= 1 (an integer), not {value!r}.")
        if self.float32_dot not in FLOAT32_DOTS:
            raise ValueError(
                f"CrissCrossConfig.float32_dot={self.float32_dot!r}: use one of {', '.join(map(repr, FLOAT32_DOTS))}."
            )
        if not isinstance(self.alternate_cv_order, bool):
            raise ValueError(
                f"CrissCrossConfig.alternate_cv_order={self.alternate_cv_order!r}: must be True or False.")


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Launch shape of the Mosaic GPU forward kernel (the backward's is fixed by the strip), and
    the order in which the forward's and the backward's kernels take the images.

    query_warpgroups: compute warpgroups of 64 queries per CTA (1 or 2). Two
      share each value tile between 128 queries; one doubles the CTAs (a
      fuller grid at small batches) but reads every value tile twice per
      strip of up to 128 pixels.
    stages: value tiles in flight in the TMA ring (2 or 3), each 16 KiB per
      128 keys (with 4, the column pass at 128 keys needs 233 640 bytes of
      shared memory, over the H100's 232 448). None (the default) takes 3
      where both directions' forwards hold as many query warpgroups with 3 as
      with 2, else 2: on H100s at (2, 97, 97, 64, 512) bfloat16, 3 stages
      led forward+backward in four runs, by 2%, 3% and 6% in the three steady
      ones (0.151 against 0.154, 0.155 and 0.160 ms) and 24% in another.
    pad_positions: pad H and W to multiples of 8 with XLA copies, so that TMA
      moves whole (8, 64) tiles, instead of moving 64-channel rows straight
      from and to the caller's arrays (see mosaic_layout). The copies cost
      a read and a write of every input, output and gradient.
    value_splits: CTAs that share a strip's value channels in the forward
      (1, 2 or 4), each recomputing Q·Kᵀ and the softmax for its queries and
      streaming its share of V's 64-channel tiles. At small batches it fills
      the grid: at (2, 97, 97) one CTA per strip is 194 CTAs for an H100's
      132 SMs, one full wave and a second under half full. Reduced to the
      largest of 1, 2, 4 that divides the value tiles (Cv padded to a
      multiple of 64, over 64).
    persistent: launch one CTA per SM (132 on an H100 SXM), each looping
      over its share of the forward's work items (image, strip, query block,
      value split) and loading the next item's queries and keys while the
      current item's value tiles stream, instead of one CTA per item, whose
      loads and softmax run while its value ring stands empty. 16-bit
      inputs only (the float32 forward splits V's tiles within one item).
      Not yet timed on a GPU: `experiments/gpu_check.sh tune` times it.
    alternate_image_order: each kernel of the forward, and of the backward,
      after the first takes the images in the other order from the kernel
      before it (the column pass from the last image to the first), so that
      it starts on the image whose maps the kernel before it read and wrote
      last, which L2 (50 MB on an H100) may still hold: at (2, 97, 97, 64,
      512) bfloat16 one image's q, k, v and row result are 21.7 MB. The
      results are the same to the bit either way. Not yet timed on a GPU
      (`experiments/gpu_check.sh tune` times both orders).
    """

    query_warpgroups: int = 2
    stages: int | None = None
    pad_positions: bool = False
    value_splits: int = 1
    persistent: bool = False
    alternate_image_order: bool = True

    def __post_init__(self):
        # Integers only: `2.0 in (1, 2)` holds, and a float would reach the kernels' shapes.
        if not _is_int(self.query_warpgroups) or self.query_warpgroups not in (1, 2):
            raise ValueError(f"MosaicConfig.query_warpgroups={self.query_warpgroups!r}: must be 1 or 2.")
        if self.stages is not None and (not _is_int(self.stages) or self.stages not in (2, 3)):
            raise ValueError(f"MosaicConfig.stages={self.stages!r}: must be 2, 3 or None (3 where it fits).")
        if not isinstance(self.pad_positions, bool):
            # A string such as "False" from a command line would otherwise pad.
            raise ValueError(f"MosaicConfig.pad_positions={self.pad_positions!r}: must be True or False.")
        if not _is_int(self.value_splits) or self.value_splits not in (1, 2, 4):
            raise ValueError(f"MosaicConfig.value_splits={self.value_splits!r}: must be 1, 2 or 4.")
        if not isinstance(self.persistent, bool):
            raise ValueError(f"MosaicConfig.persistent={self.persistent!r}: must be True or False.")
        if not isinstance(self.alternate_image_order, bool):
            raise ValueError(
                f"MosaicConfig.alternate_image_order={self.alternate_image_order!r}: must be True or False.")


XLA_PRODUCTS = ("exact", "bf16x6")


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """How the xla implementation multiplies float32 inputs (16-bit ones keep exact products).

    float32_products: "exact" (the default): full float32 products
      (precision HIGHEST). "bf16x6": each float32 operand as three bfloat16
      parts and each product as the six part products that matter, summed in
      float32 (`jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6`): tensor-core
      products on GPUs. An emulation put it 2e-7 to 9e-7 (relative norm
      error of out, dq, dk, dv) from the float64 result at three shapes
      (experiments/split_precision.py); exact float32 was 1.6e-7 to 2.6e-7
      at another (experiments/attention_check.py). XLA's CPU backend
      multiplies it exactly.
    """

    float32_products: Literal["exact", "bf16x6"] = "exact"

    def __post_init__(self):
        if self.float32_products not in XLA_PRODUCTS:
            raise ValueError(f"XlaConfig.float32_products={self.float32_products!r}: use one of "
                             f"{', '.join(map(repr, XLA_PRODUCTS))}.")

    def precision(self, dtype):
        """The products' precision for inputs of `dtype`, for jax.lax.dot_general."""
        if jnp.dtype(dtype) == jnp.float32 and self.float32_products == "bf16x6":
            return FLOAT32_DOT_PRECISIONS["bf16x6"]
        return FLOAT32_DOT_PRECISIONS["ieee"]


def padded_channels(c: int) -> int:
    """Channel count as the kernels see it: a power of two >= 16, masked beyond c."""
    return max(MIN_DOT_DIM, next_power_of_two(c))


def _fit_block(length: int, preferred: int) -> int:
    """The preferred block, shrunk (not below 16) when the strip is shorter."""
    return max(MIN_DOT_DIM, min(preferred, next_power_of_two(length)))


def default_config(h: int, w: int, cqk: int, cv: int, itemsize: int, arch: int | None = HOPPER) -> CrissCrossConfig:
    """Heuristic tiling for a (B, H, W, Cqk | Cv) problem of the given element size, on a CUDA GPU
    of compute capability `arch` (major * 10 + minor; None for one not known by name).

    Hopper (sm_90, the default):

    16-bit maps whose rows and columns both have 65-128 pixels, with at most
    64 query/key channels (CCNet's 97x97 training map), take one 128-pixel
    block per strip and 8 warps: the dK/dQ kernel then holds the whole strip
    and writes dQ itself (no float32 partial sums, no XLA reduction; 254-255
    registers, no spills), and on two H100s this was 9% and 10% faster
    forward+backward than 64-pixel blocks with 4 warps (experiments/RESULTS.md).
    Both directions must be that long: the blocks serve both, and a shorter
    direction would pad its strips to 128.

    Otherwise, chosen from the sm_90 resource reports of
    experiments/kernel_resources.py (Triton compiling on CPU, CCNet shapes,
    4 warps, 2 stages), so that the products compile to wgmma and no kernel
    spills registers at CCNet's maps (97x97, 128x256, 129x257):
      16-bit inputs: 64-pixel blocks, 128-channel Cv tiles, 64-channel tiles
        in the dK/dQ kernel (with 128 it spills 72-80 bytes at 128x256);
      float32 (chosen for TF32x3 products; bf16x6 takes less shared memory
        in every kernel, fewer registers in the forward): 64-pixel blocks (wgmma needs
        64 rows; 32-pixel blocks compile to mma.sync only), 64-channel Cv
        tiles, and in the dK/dQ kernel 32-channel tiles and 16-pixel key
        blocks (with 64-pixel key blocks it spills 400-460 bytes; its dK
        product, 16 rows, stays on mma.sync). One backward stage where a
        strip ends inside a block (97, 65, 129 pixels...): with two, the
        column dV kernel spills 24-40 bytes there (Triton 3.9, bf16x6
        products), while one stage spills 8 at 128x256. At 97x97 one stage
        was also 4% faster forward+backward in one H100 run.
    Wide Cqk shrinks the pixel blocks so that a key block stays around
    32 KiB; short strips shrink them to the strip.

    Other GPUs (Ampere sm_80/86, Ada sm_89, Blackwell sm_100/120) multiply
    with mma.sync or tcgen05, where Hopper's tiling spills: 16-48 bytes in
    the 16-bit dK/dQ kernel, up to 540 bytes in the float32 forward and dV
    kernels and 80 in dK/dQ (Triton 3.9 compiling on CPU, where they have
    not yet been timed). There, so that no kernel spills at those
    maps on any of sm_80, sm_86, sm_89, sm_100 and sm_120, and every kernel
    fits in 99 KiB of shared memory:
      16-bit inputs: 16-channel tiles in the dK/dQ kernel's dP loop, and
        8 warps in the forward;
      float32: 32-pixel blocks, 32-channel Cv tiles and 8 warps throughout.
    """
    for name, value in (("h", h), ("w", w), ("cqk", cqk), ("cv", cv)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"default_config: {name}={value!r} must be an integer >= 1.")
    if not _is_int(itemsize) or itemsize not in (2, 4):
        raise ValueError(
            f"default_config: itemsize={itemsize!r} must be 2 (bfloat16, float16) or 4 (float32), "
            "the bytes of one input element, e.g. jnp.dtype(dtype).itemsize."
        )
    if arch is not None and (not _is_int(arch) or arch < 10):
        # A float (9.0) or a string ("sm_90") would not equal HOPPER and silently take another tiling.
        raise ValueError(
            f"default_config: arch={arch!r} must be a compute capability as major * 10 + minor "
            "(90 for an H100, 80 for an A100), or None."
        )
    h, w, cqk, cv = int(h), int(w), int(cqk), int(cv)  # numpy integers have no bit_length
    cqk_p = padded_channels(cqk)
    hopper = arch == HOPPER
    whole_strip = itemsize <= 2 and cqk_p <= 64 and 64 < min(h, w) and max(h, w) <= 128
    warps = 8 if whole_strip else 4
    fwd_warps = warps
    if itemsize <= 2:
        pixel_block, cv_tile, dkq_cv_tile = (128 if whole_strip else 64, 128, 64 if hopper else MIN_DOT_DIM)
        fwd_warps = warps if hopper else 8
    elif hopper:
        pixel_block, cv_tile, dkq_cv_tile = 64, 64, 32
    else:
        pixel_block, cv_tile, dkq_cv_tile = 32, 32, 32
        warps = fwd_warps = 8
    while pixel_block > MIN_DOT_DIM and pixel_block * cqk_p * itemsize > 32 * 1024:
        pixel_block //= 2
    block = _fit_block(max(h, w), pixel_block)
    # float32's column dV kernel spills (24-40 bytes) with two backward stages where a strip ends
    # inside a block, and with one stage at 128x256, so one stage only for ragged strips.
    ragged = h % block or w % block
    return CrissCrossConfig(
        block_q=block,
        block_k=block,
        block_cv=min(cv_tile, padded_channels(cv)),
        bwd_block_cv=min(dkq_cv_tile, padded_channels(cv)),
        dkq_block_k=None if itemsize <= 2 else MIN_DOT_DIM,
        fwd_num_warps=fwd_warps,
        fwd_num_stages=2,
        bwd_num_warps=warps,
        bwd_num_stages=1 if itemsize > 2 and ragged else 2,
    )
