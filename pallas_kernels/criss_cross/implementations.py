"""The implementations of the criss-cross attention op, in one registry, and how one is chosen.

    xla     plain jnp: every backend and dtype; materialises the B·H·W·(H+W) energies.
    triton  Pallas kernels lowered through Triton: CUDA GPUs (or the Pallas interpreter),
            every dtype, any strip length.
    mosaic  Pallas Mosaic GPU kernels (TMA, wgmma, warp specialisation): Hopper GPUs (sm_90)
            (or the Mosaic GPU interpreter), bfloat16/float16, strips of at most 256 pixels,
            at most 128 query/key channels. Strips past 128 pixels take a query-side and a
            key-side backward kernel; with strips past 192 and more than 64 query/key
            channels, the whole backward is the Triton one. float32 inputs: forward and backward
            on float16 pairs where they fit in shared memory (strips of up to 128 pixels at
            64 query/key channels); not yet timed on a GPU.
    pallas  alias of the best Pallas kernels for the device and input: mosaic where it can
            serve 16-bit inputs on a Hopper GPU, triton otherwise.

`implementation=None` picks, by what was measured on an H100 (experiments/RESULTS.md):
mosaic for 16-bit inputs on Hopper GPUs where it can serve them (6.1x xla at CCNet's training
shape, 1.5x the Triton kernels), triton for other 16-bit inputs on CUDA GPUs (4.0x xla), xla
for float32 (where the Triton kernels were 0.5-0.6x xla, with either product mode) and on
other backends; with interpret=True, the Triton kernels in the Pallas interpreter.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.criss_cross.mosaic_backward_pairs import float32_backward_unsupported
from pallas_kernels.criss_cross.mosaic_forward import forward_warpgroups
from pallas_kernels.criss_cross.mosaic_layout import MAX_STRIP, SUPPORTED_DTYPES, round_up

Implementation = Literal["xla", "triton", "mosaic", "pallas"] | None
IMPLEMENTATIONS = ("xla", "triton", "mosaic")
ALIASES = ("pallas",)
MOSAIC_MAX_QK_CHANNELS = 128
# What the float32 forward's float16 pairs leave room for in shared memory at CCNet's channels
# (mosaic_forward decides): one 64-query warpgroup per CTA at 128 keys with 64 query/key channels.
MOSAIC_MAX_FLOAT32_STRIP = 128
MOSAIC_MAX_FLOAT32_QK_CHANNELS = 64
# Device kinds of Hopper (sm_90) GPUs, as jax reports them.
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def lowering_target(x: jax.Array) -> tuple[bool, str]:
    """(whether `x` lives on, or is being lowered for, a CUDA GPU; that device's kind). A tracer
    under a mesh of abstract devices (a compile-only H100, say) answers for them; a plain trace,
    which does not know its platform, answers for the default backend."""
    if isinstance(x, jax.core.Tracer):
        mesh = jax.sharding.get_abstract_mesh()
        device = None if mesh.empty else getattr(mesh, "abstract_device", None)
        if device is not None:
            return device.platform in ("gpu", "cuda"), device.device_kind
        return jax.default_backend() == "gpu", jax.devices()[0].device_kind
    device = next(iter(x.devices()))
    return device.platform == "gpu", device.device_kind


def is_hopper(device_kind: str | None) -> bool:
    return device_kind is not None and any(kind in device_kind for kind in _HOPPER_KINDS)


def mosaic_unsupported(dtype, h: int, w: int, cqk: int) -> str | None:
    """Why the Mosaic kernels cannot serve this input, or None if they can."""
    if round_up(cqk, 64) > MOSAIC_MAX_QK_CHANNELS:
        return f"they take at most {MOSAIC_MAX_QK_CHANNELS} query/key channels, not {cqk}"
    if jnp.dtype(dtype) == jnp.float32:
        keys = round_up(max(h, w), 64)
        if not forward_warpgroups(keys, round_up(cqk, 64), 2, dtype, 1):
            return (f"their float32 forward (float16 pairs) does not fit an H100's shared memory for a {h}x{w} "
                    f"map with {cqk} query/key channels (it holds strips of {MOSAIC_MAX_FLOAT32_STRIP} pixels with "
                    f"{MOSAIC_MAX_FLOAT32_QK_CHANNELS})")
        problem = float32_backward_unsupported(h, w, cqk)
        return None if problem is None else f"their float32 backward (float16 pairs) cannot take it: {problem}"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"they take bfloat16, float16 or float32 inputs, not {jnp.dtype(dtype).name}"
    if max(h, w) > MAX_STRIP:
        return f"their strips hold at most {MAX_STRIP} pixels, and this map is {h}x{w}"
    return None


def choose(
    requested: Implementation,
    *,
    dtype,
    h: int,
    w: int,
    cqk: int,
    on_cuda: bool,
    device_kind: str | None,
    interpret: bool,
) -> str:
    """The implementation that runs: "xla", "triton" or "mosaic"; a ValueError when the requested
    one cannot serve the input, naming one that can."""
    if requested is not None and requested not in IMPLEMENTATIONS + ALIASES:
        raise ValueError(
            f"criss_cross_attention: unknown implementation {requested!r}; use one of "
            f"{', '.join(map(repr, IMPLEMENTATIONS + ALIASES))} or None."
        )
    mosaic_problem = mosaic_unsupported(dtype, h, w, cqk)
    # float32 on Mosaic has not been timed on a GPU: "pallas" keeps the Triton kernels for it.
    sixteen_bit = jnp.dtype(dtype).itemsize == 2
    mosaic_best = mosaic_problem is None and sixteen_bit and on_cuda and is_hopper(device_kind)
    best_pallas = "mosaic" if mosaic_best else "triton"
    if requested is None:
        if interpret:
            return "triton"
        return best_pallas if on_cuda and sixteen_bit else "xla"
    if requested == "pallas":
        return "triton" if interpret else best_pallas
    if requested == "mosaic":
        if mosaic_problem is not None:
            raise ValueError(
                f"criss_cross_attention: implementation='mosaic' cannot serve this input: {mosaic_problem}. "
                "implementation='triton' (CUDA GPUs) or 'xla' can."
            )
        if not interpret and not (on_cuda and is_hopper(device_kind)):
            where = device_kind or ("a CUDA GPU" if on_cuda else "a non-CUDA backend")
            raise ValueError(
                "criss_cross_attention: implementation='mosaic' needs a Hopper GPU (H100/H200, sm_90), "
                f"but the inputs target {where}. Use implementation='triton' on other CUDA GPUs, "
                "interpret=True for the Mosaic GPU interpreter, or implementation='xla'."
            )
    return requested
