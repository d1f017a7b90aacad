"""The implementations of the criss-cross attention op, in one registry, and how one is chosen.

    xla     plain jnp: every backend and dtype; materialises the B·H·W·(H+W) energies.
    triton  Pallas kernels lowered through Triton: CUDA GPUs from Ampere (sm_80) on, with a
            tiling per generation (config.default_config), or the Pallas interpreter; every
            dtype, any strip length.
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
mosaic for 16-bit inputs on Hopper GPUs where it can serve them (6.2-6.3x xla at CCNet's training
shape, 1.5x the Triton kernels), triton for other 16-bit inputs on CUDA GPUs (4.1x xla), xla
for float32 (where the Triton kernels were 0.5-0.6x xla, with either product mode), on GPUs
before Ampere (no bfloat16 tensor cores: compiled for sm_70 and sm_75 the kernels spill 4-49 KB
a thread, and some of their blocks outgrow a Turing GPU's 64 KiB) and on other backends; with
interpret=True, the Triton kernels in the Pallas interpreter.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.criss_cross.gpu_targets import HOPPER, TRITON_MIN_ARCH, cuda_arch
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


class LoweringTarget(NamedTuple):
    """Where an op is lowered: whether for a CUDA GPU, that device's kind ("NVIDIA H100 80GB
    HBM3"), and its compute capability as major * 10 + minor (None where nothing says)."""

    on_cuda: bool
    device_kind: str | None
    arch: int | None


def check_interpret(interpret: object, where: str) -> None:
    """A ValueError unless `interpret` is True or False: a string such as "no" would be true, and
    1 or 0 may be a count or a position passed by mistake."""
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"{where}: interpret must be True or False, got {interpret!r}.")


def _compute_capability(device) -> str | None:
    """A real GPU's own ("9.0"). An abstract device has only its kind, but shard_map traces under
    an abstract mirror of the real mesh: where the kind is this process's GPU's, that GPU's."""
    own = getattr(device, "compute_capability", None)
    if own is not None:
        return own
    local = jax.devices()[0]
    return getattr(local, "compute_capability", None) if local.device_kind == device.device_kind else None


def _target(device) -> LoweringTarget:
    kind = device.device_kind
    capability = _compute_capability(device)
    # jax calls an AMD GPU "gpu" too; it names its architecture ("gfx942") where CUDA gives a
    # version. Nothing here was built or checked for ROCm: it takes what other backends take.
    rocm = any(str(name).startswith("gfx") for name in (kind, capability))
    on_cuda = device.platform in ("gpu", "cuda") and not rocm
    return LoweringTarget(on_cuda, kind, cuda_arch(kind, capability) if on_cuda else None)


def lowering_target(x: jax.Array) -> LoweringTarget:
    """The device `x` lives on, or is being lowered for. A tracer under a mesh of abstract devices
    (a compile-only H100, say) answers for them; a plain trace, which does not know its platform,
    answers for the default backend."""
    if isinstance(x, jax.core.Tracer):
        mesh = jax.sharding.get_abstract_mesh()
        device = None if mesh.empty else getattr(mesh, "abstract_device", None)
        if device is not None:
            return _target(device)
        return _target(jax.devices()[0])
    return _target(next(iter(x.devices())))


def is_hopper(device_kind: str | None) -> bool:
    return cuda_arch(device_kind) == HOPPER


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
    target: LoweringTarget,
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
    on_hopper = target.on_cuda and target.arch == HOPPER
    mosaic_best = mosaic_problem is None and sixteen_bit and on_hopper
    best_pallas = "mosaic" if mosaic_best else "triton"
    # An unknown CUDA GPU is taken for a new one.
    triton_serves = target.arch is None or target.arch >= TRITON_MIN_ARCH
    if requested is None:
        if interpret:
            return "triton"
        return best_pallas if target.on_cuda and sixteen_bit and triton_serves else "xla"
    if requested in ("triton", "pallas") and target.on_cuda and not interpret and not triton_serves:
        raise ValueError(
            f"criss_cross_attention: implementation={requested!r} needs an Ampere or newer GPU (compute capability "
            f"8.0 or more), but the inputs target {target.device_kind} (sm_{target.arch}): before Ampere the "
            "Triton kernels' products have no bfloat16 tensor cores and their blocks need more shared memory "
            "than the GPU gives. Use implementation='xla' (or None, which picks it there)."
        )
    if requested == "pallas":
        return "triton" if interpret else best_pallas
    if requested == "mosaic":
        if mosaic_problem is not None:
            raise ValueError(
                f"criss_cross_attention: implementation='mosaic' cannot serve this input: {mosaic_problem}. "
                "implementation='triton' (CUDA GPUs) or 'xla' can."
            )
        if not interpret and not on_hopper:
            where = target.device_kind or ("a CUDA GPU" if target.on_cuda else "a non-CUDA backend")
            other = "implementation='triton' on other CUDA GPUs from Ampere on, " if triton_serves else ""
            raise ValueError(
                "criss_cross_attention: implementation='mosaic' needs a Hopper GPU (H100/H200, sm_90), "
                f"but the inputs target {where}. Use {other}interpret=True for the Mosaic GPU interpreter, "
                "or implementation='xla'."
            )
    return requested
