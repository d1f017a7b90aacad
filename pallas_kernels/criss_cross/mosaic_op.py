"""The Mosaic GPU criss-cross attention op: Hopper kernels under custom_vjp.

Channels are padded to multiples of 64 (CCNet's 64 and 512 need none), and
H and W are not padded unless the config asks for it (see mosaic_layout);
the row pass and then the column pass run, and anything padded is sliced
back. The residuals are q, k, v, out and the per-pixel lse (B, H, W), as for
the Triton op (float32: v's float16 pair instead of v, below). Each
direction's backward is one kernel for strips up to 128 pixels and a
query-side and a key-side kernel for longer ones. A direction of
strips up to 128 pixels goes first, and its kernel also sums the per-pixel
delta = sum_c dO·O that both directions need, unless the output would have to
be padded for it (Cv not a multiple of 64, or padded H and W) or both
directions are longer: XLA sums it beforehand then. With strips
of more than 192 pixels and more than 64 query/key channels the key-side
kernel does not fit in shared memory, and the whole backward runs the Triton
kernels on the same residuals.

float32 inputs run as float16 pairs, each image of a map with one power-of-two
scale from its largest magnitude: the forward kernels of the 16-bit path with three
products each (mosaic_forward), and per direction a query-side and a
key-side backward kernel (mosaic_backward_pairs). XLA splits q and k; the
kernels split V's and dO's float32 tiles in shared memory (mosaic_split), so
no pair of a (B, H, W, Cv) map is written or kept. The residuals add v's
(scale, unscale) per image to the 16-bit op's. Per image, so that an image's
results do not depend on the others in its batch: with one scale for the
batch, an image far smaller than the largest lost accuracy, its lo parts
falling into float16's subnormals (an image at 1e-7 of another's scale came
out with 4e-5 relative error).

With `MosaicConfig.alternate_image_order` (the default), the kernels of the
forward, and those of the backward, take the images in turn from the first
and from the last, so that each starts where the kernel before it finished,
on maps L2 may still hold.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from pallas_kernels.criss_cross.config import MosaicConfig, default_config
from pallas_kernels.criss_cross.mosaic_backward import (
    MAX_BACKWARD_STRIP,
    strip_backward_mosaic,
)
from pallas_kernels.criss_cross.mosaic_backward_long import long_backward_warpgroups, strip_backward_long_mosaic
from pallas_kernels.criss_cross.mosaic_backward_pairs import pairs_unscale, strip_backward_pairs
from pallas_kernels.criss_cross.mosaic_forward import forward_unscale, forward_warpgroups, strip_forward_mosaic
from pallas_kernels.criss_cross.mosaic_layout import (
    CHANNEL_TILE,
    MosaicStrips,
    map_pads,
    pad_map,
    round_up,
)
from pallas_kernels.criss_cross.mosaic_split import map_scales
from pallas_kernels.criss_cross.residuals import name_residuals
from pallas_kernels.criss_cross.tile_products import split_images


def _row_tma(config: MosaicConfig, interpret: bool) -> bool:
    # The interpreter keeps the two views of a tile buffer in separate buffers, and takes tiled
    # copies at any H and W.
    return not (config.pad_positions or interpret)


def _pad(x: jax.Array, config: MosaicConfig) -> jax.Array:
    return pad_map(x, positions=config.pad_positions)


def forward_strips(q: jax.Array, config: MosaicConfig, interpret: bool) -> tuple[MosaicStrips, MosaicStrips, int]:
    """Both directions' strips, each with as many query warpgroups (up to the config's) as its
    forward can hold in shared memory, and the value tiles in flight that the forward takes: the
    config's, or where it leaves them open, 3 unless a direction would hold fewer warpgroups with
    3 than with 2."""
    b, h, w, cqk = q.shape
    q_channels = round_up(cqk, CHANNEL_TILE)
    keys = [MosaicStrips(direction, b, h, w).keys for direction in ("row", "col")]

    fits = {depth: [forward_warpgroups(n, q_channels, depth, q.dtype, config.query_warpgroups) for n in keys]
            for depth in (2, 3)}
    stages = config.stages or (3 if all(fits[2]) and fits[3] == fits[2] else 2)
    strips = []
    for direction, n_keys, n_wg in zip(("row", "col"), keys, fits[stages]):
        if n_wg == 0:
            raise ValueError(
                f"criss_cross_attention: the Mosaic forward for {n_keys}-key strips with {cqk} query/key channels "
                f"and {stages} stages does not fit in an H100's shared memory; "
                + ("use MosaicConfig(stages=2)" if stages == 3 else "use implementation='triton'")
            )
        strips.append(MosaicStrips(direction, b, h, w, n_wg, _row_tma(config, interpret)))
    return strips[0], strips[1], stages


def per_strip(x: jax.Array, strips: MosaicStrips) -> jax.Array:
    """(B, H, W) per-pixel values laid out as (B, num_strips, stats_length) for `strips`."""
    if strips.direction == "col":
        x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, strips.stats_length - strips.length)))


def per_pixel(x: jax.Array, strips: MosaicStrips) -> jax.Array:
    """Inverse of `per_strip`: (B, num_strips, stats_length) -> (B, H, W)."""
    x = x[:, :, : strips.length]
    return jnp.swapaxes(x, 1, 2) if strips.direction == "col" else x


def _unpad(x: jax.Array, like: jax.Array) -> jax.Array:
    if x.shape == like.shape:
        return x
    _, h, w, c = like.shape
    return x[:, :h, :w, :c]


def value_splits(config: MosaicConfig, value_tiles: int) -> int:
    """The forward's CTAs per block of queries: the most of 1, 2 and 4, at most the config's, that
    divides the value tiles (64-channel tiles of the padded Cv)."""
    return max(n for n in (1, 2, 4) if n <= config.value_splits and value_tiles % n == 0)


# Streaming multiprocessors of an H100 SXM (and of an H200): the persistent forward's CTAs where
# the op is traced for CUDA on another platform (an export from the CPU).
H100_MULTIPROCESSORS = 132


def multiprocessors() -> int:
    """SMs of the default device where it is a CUDA GPU, else an H100 SXM's."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        return getattr(device, "core_count", None) or H100_MULTIPROCESSORS
    return H100_MULTIPROCESSORS


def image_orders(config: MosaicConfig) -> Iterator[bool]:
    """`images_last_first` for each kernel of a forward or a backward, in launch order: False,
    True, False, ... with the config's alternate_image_order, else False throughout."""
    return itertools.cycle((False, config.alternate_image_order))


def _forward(q, k, v, config: MosaicConfig, interpret: bool):
    """(out, lse, v_scales): v_scales is None, or for float32 v's (scale, unscale) per image (B, 2),
    which the backward takes so as not to find v's largest magnitudes again."""
    rows, cols, stages = forward_strips(q, config, interpret)
    qp, kp, vp = _pad(q, config), _pad(k, config), _pad(v, config)
    launch = dict(interpret=interpret, stages=stages,
                  value_splits=value_splits(config, vp.shape[-1] // CHANNEL_TILE),
                  persistent_ctas=multiprocessors() if config.persistent else None)
    v_scales = None
    if q.dtype == jnp.float32:
        if config.persistent:
            raise ValueError("criss_cross_attention: MosaicConfig(persistent=True) takes bfloat16 or float16 inputs; "
                             "float32 runs one CTA per work item (drop persistent=True)")
        q_pair, k_pair = split_images(qp), split_images(kp)
        v_scales = map_scales(vp)
        launch["unscale"] = forward_unscale(q_pair.unscale, k_pair.unscale, v_scales)
        qp, kp = (q_pair.hi, q_pair.lo), (k_pair.hi, k_pair.lo)
    orders = image_orders(config)
    o_row, lse_row = strip_forward_mosaic(rows, qp, kp, vp, images_last_first=next(orders), **launch)
    lse_row = per_strip(per_pixel(lse_row, rows), cols)
    out, lse = strip_forward_mosaic(cols, qp, kp, vp, previous=(o_row, lse_row), images_last_first=next(orders),
                                    **launch)
    return _unpad(out, v), per_pixel(lse, cols), v_scales


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def criss_cross_attention_mosaic(
    q: jax.Array, k: jax.Array, v: jax.Array, config: MosaicConfig, interpret: bool
) -> jax.Array:
    """Criss-cross attention through the Mosaic GPU kernels (inputs validated; float32 ones as
    float16 pairs, forward and backward).

    q, k: (B, H, W, Cqk); v: (B, H, W, Cv); returns (B, H, W, Cv) in v's dtype.
    `config` shapes the forward's launch; `interpret` runs the kernels in the
    Mosaic GPU interpreter on the CPU.
    """
    return _forward(q, k, v, config, interpret)[0]


def _vjp_forward(q, k, v, config, interpret):
    out, lse, v_scales = _forward(q, k, v, config, interpret)
    out, lse = name_residuals(out, lse)
    return out, (q, k, v, out, lse, v_scales)


def _vjp_backward(config, interpret, residuals, dout):
    q, k, v, out, lse, v_scales = residuals
    dout = dout.astype(out.dtype)
    b, h, w, _ = q.shape
    row_tma = _row_tma(config, interpret)
    if q.dtype == jnp.float32:
        return _float32_backward(q, k, v, v_scales, out, lse, dout, config, interpret)
    # The one-CTA backward takes every query warpgroup its strip needs (two at 128 keys).
    rows, cols = MosaicStrips("row", b, h, w, row_tma=row_tma), MosaicStrips("col", b, h, w, row_tma=row_tma)
    if not all(_backward_fits(strips, q) for strips in (rows, cols)):
        from pallas_kernels.criss_cross.pallas_op import pallas_backward

        tiling = default_config(h, w, q.shape[-1], v.shape[-1], q.dtype.itemsize)
        return pallas_backward(q, k, v, out, lse, dout, tiling, interpret)
    qp, kp, vp, dop = (_pad(x, config) for x in (q, k, v, dout))
    # The one-CTA kernel sums delta on the way (it streams every channel tile of dO anyway), so a
    # direction it serves goes first and hands delta to the other; unless the output's channels
    # need padding, whose copy would cost more than the reduction saves. pad_positions pads the
    # output with everything else: both layouts then sum delta alike, and agree to the bit (an
    # XLA sum differs from the kernel's in the last bit of some pixels' delta, and so of dq).
    first, second = sorted((rows, cols), key=lambda strips: strips.keys > MAX_BACKWARD_STRIP)
    kernel_sums = first.keys <= MAX_BACKWARD_STRIP and map_pads(out.shape, positions=False) is None
    delta = None if kernel_sums else jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    operands = dict(q=qp, k=kp, v=vp, dout=dop, lse=lse, interpret=interpret, orders=image_orders(config))
    grads, delta = _backward_pass(first, delta=delta, out=_pad(out, config) if kernel_sums else None, **operands)
    grads, _ = _backward_pass(second, delta=delta, previous=grads, **operands)
    return tuple(_unpad(g, x) for g, x in zip(grads, (q, k, v)))


def _float32_backward(q, k, v, v_scales, out, lse, dout, config: MosaicConfig, interpret: bool):
    """The float32 VJP: XLA splits q and k into float16 pairs (one scale per image), finds dO's scales
    and sums delta = sum_c dO·O; each direction then runs its query-side and key-side kernels,
    which split V's and dO's float32 tiles themselves (v with the forward's scale)."""
    b, h, w, _ = q.shape
    row_tma = _row_tma(config, interpret)
    q_pair, k_pair = split_images(_pad(q, config)), split_images(_pad(k, config))
    vp, dop = _pad(v, config), _pad(dout, config)
    unscale = pairs_unscale(q_pair.unscale, k_pair.unscale, v_scales, map_scales(dop))
    delta = jnp.sum(dout * out, axis=-1)
    grads = None
    orders = image_orders(config)
    for direction in ("row", "col"):
        strips = MosaicStrips(direction, b, h, w, max_query_warpgroups=1, row_tma=row_tma)
        grads = strip_backward_pairs(strips, (q_pair.hi, q_pair.lo), (k_pair.hi, k_pair.lo), vp, dop,
                                     per_strip(lse, strips), per_strip(delta, strips), unscale,
                                     interpret=interpret, previous=grads,
                                     images_last_first=(next(orders), next(orders)))
    return tuple(_unpad(g, x) for g, x in zip(grads, (q, k, v)))


def _backward_pass(strips: MosaicStrips, *, q, k, v, dout, lse, delta, interpret: bool, orders: Iterator[bool],
                   out=None, previous=None):
    """One direction's padded (dq, dk, dv), and the per-pixel (B, H, W) delta: as given, or (delta
    None, strips of at most 128 pixels) summed by the kernel from `out`. Its kernels take their
    image orders from `orders`."""
    if strips.keys > MAX_BACKWARD_STRIP:
        grads = strip_backward_long_mosaic(strips, q, k, v, dout, per_strip(lse, strips), per_strip(delta, strips),
                                           interpret=interpret, previous=previous,
                                           images_last_first=(next(orders), next(orders)))
        return grads, delta
    grads, strip_delta = strip_backward_mosaic(strips, q, k, v, dout, per_strip(lse, strips),
                                               None if delta is None else per_strip(delta, strips),
                                               out=out, interpret=interpret, previous=previous,
                                               images_last_first=next(orders))
    return grads, per_pixel(strip_delta, strips) if delta is None else delta


def _backward_fits(strips: MosaicStrips, q: jax.Array) -> bool:
    if strips.keys <= MAX_BACKWARD_STRIP:
        return True
    return all(long_backward_warpgroups(strips.keys, round_up(q.shape[-1], CHANNEL_TILE), q.dtype))


criss_cross_attention_mosaic.defvjp(_vjp_forward, _vjp_backward)
