"""Dilated (atrous) convolution computed as an undilated one over space-to-batch sub-images.

With dilation d and stride 1, output pixel i reads padded inputs i, i + d, i + 2d, ...: pixels of
the same residue i mod d. Splitting the padded map into its d x d residue sub-images (each a
(H/d, W/d) map, stacked on the batch axis) turns the dilated convolution into an undilated one
over the sub-images, with the same kernel; interleaving the outputs back gives the same function.

Why: on an H100 (cuDNN in jax 0.11.2, 2026-11-27) a bfloat16 3x3 convolution at dilation 2 or 4
ran forward+backward 8x slower than at dilation 1 on CCNet's (2, 97, 97, 256) maps (3.2 against
0.38 ms; experiments/bench_convs.py). XLA hands cuDNN the forward and the input gradient as
dilated convolutions and the kernel gradient as a strided one with a 97x97 window, and for those
cuDNN ran generic kernels instead of its tensor-core ones. layer3 and layer4 of the
output-stride-8 backbone are all dilated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from pallas_kernels.criss_cross.implementations import lowering_target

DilatedConvs = Literal["auto", "space_to_batch", "native"]
_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, lhs_shape, rhs_shape) -> bool:
    return dimension_numbers == lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)


def space_to_batch_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    **kwargs,
) -> jax.Array:
    """`lax.conv_general_dilated` with the same arguments and result (up to float rounding); a
    stride-1, explicitly padded NHWC/HWIO convolution with kernel dilation > 1 runs undilated over
    the d_h x d_w residue sub-images of the padded input. Every other convolution goes to
    `lax.conv_general_dilated` as it is. Usable as `nnx.Conv(conv_general_dilated=...)`."""
    rhs_dilation = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
    if (
        lhs.ndim != 4
        or math.prod(rhs_dilation) == 1
        or tuple(window_strides) != (1, 1)
        or tuple(lhs_dilation or (1, 1)) != (1, 1)
        or isinstance(padding, str)
        or feature_group_count != 1
        or kwargs.get("batch_group_count", 1) != 1
        or not _is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
        # H, W or C split over devices (explicit sharding): the sub-images would cross them.
        or any(axis is not None for axis in jax.typeof(lhs).sharding.spec[1:])
    ):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, **kwargs,
        )
    b, h, w, c = lhs.shape
    kh, kw = rhs.shape[:2]
    dh, dw = rhs_dilation
    (top, bottom), (left, right) = padding
    out_h, out_w = h + top + bottom - dh * (kh - 1), w + left + right - dw * (kw - 1)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"space_to_batch_conv: a {kh}x{kw} kernel at dilation {rhs_dilation} with padding "
                         f"{padding} leaves no output on a {h}x{w} map")
    # Zeros past the padded end only reach outputs past out_h x out_w, which are cropped.
    sub_h, sub_w = -(-(h + top + bottom) // dh), -(-(w + left + right) // dw)
    x = jnp.pad(lhs, ((0, 0), (top, sub_h * dh - h - top), (left, sub_w * dw - w - left), (0, 0)))
    # Each image's sub-images stay next to it on the batch axis, so a batch sharded over devices
    # stays sharded the same way, with no exchange between devices.
    x = _reshape(x, (b, sub_h, dh, sub_w, dw, c)).transpose(0, 2, 4, 1, 3, 5)
    x = _reshape(x, (b * dh * dw, sub_h, sub_w, c))
    y = lax.conv_general_dilated(
        x, rhs, (1, 1), "VALID", dimension_numbers=lax.conv_dimension_numbers(x.shape, rhs.shape, _NHWC), **kwargs
    )
    oh, ow, co = y.shape[1:]
    y = _reshape(y, (b, dh, dw, oh, ow, co)).transpose(0, 3, 1, 4, 2, 5)
    return _reshape(y, (b, oh * dh, ow * dw, co))[:, :out_h, :out_w]


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`x` reshaped, keeping the explicit sharding of its leading (batch) axis, if any: jax asks
    for the result's sharding when an explicitly sharded axis is split or merged."""
    sharding = jax.typeof(x).sharding
    if sharding.mesh.empty or sharding.spec[0] is None:
        return x.reshape(shape)
    return jnp.reshape(x, shape, out_sharding=sharding.update(spec=PartitionSpec(sharding.spec[0])))


def auto_conv(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
    """`space_to_batch_conv` where the conv runs (or is lowered for) a CUDA GPU, else
    `lax.conv_general_dilated`: on the CPU the rewrite gains little (0.75 against 0.84 s for a
    float32 (2, 97, 97, 256) conv's forward+backward) and its extra operations lengthen every
    compilation (a sixth longer for the test suite's small models)."""
    on_cuda = lowering_target(lhs).on_cuda
    return (space_to_batch_conv if on_cuda else lax.conv_general_dilated)(lhs, rhs, *args, **kwargs)


def conv_function(dilated_convs: DilatedConvs):
    """The convolution function `nnx.Conv` should call for a `dilated_convs` choice: "native"
    passes the dilation to XLA, "space_to_batch" computes it as above, and "auto" the one or the
    other as the platform wants."""
    functions = {"auto": auto_conv, "space_to_batch": space_to_batch_conv, "native": lax.conv_general_dilated}
    if dilated_convs not in functions:
        raise ValueError(f"dilated_convs={dilated_convs!r}: use 'auto', 'space_to_batch' or 'native'")
    return functions[dilated_convs]
