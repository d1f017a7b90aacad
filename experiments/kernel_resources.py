"""Registers, spills, shared memory and matrix instructions of every Triton criss-cross kernel, on CPU.

Usage: python experiments/kernel_resources.py [--arch 80] [--block-q 64 --block-k 64 --block-cv 128 ...]
       python experiments/kernel_resources.py --summary --arch 80 86 89 100 120
Lowers forward+backward at the CCNet shapes (the Triton IR does not depend on
the GPU), compiles each Triton kernel with the `triton` package for the GPU
generation given (sm_90, an H100, by default) with the default tiling for it
and the overrides given, and prints one table per generation; "fits" means no
spills and shared memory within what that generation gives a block.
--summary prints one line per generation, shape and dtype instead: the worst
spill and the largest block over the six kernels, with that generation's
default tiling and with Hopper's.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import criss_cross_attention, default_config
from pallas_kernels.criss_cross.config import FLOAT32_DOTS
from pallas_kernels.criss_cross.gpu_targets import HOPPER, shared_memory_per_block
from pallas_kernels.criss_cross.triton_resources import capture_triton_kernels, compile_for_gpu

SHAPES = {
    "train 2x97x97": (2, 97, 97, 64, 512),
    "eval 1x128x256": (1, 128, 256, 64, 512),
    "2x65x129": (2, 65, 129, 64, 512),
    "whole 1x129x257": (1, 129, 257, 64, 512),  # a 1024x2048 Cityscapes image at stride 8
}


def forward_backward(config):
    def f(q, k, v, g):
        out, vjp = jax.vjp(
            lambda q, k, v: criss_cross_attention(q, k, v, implementation="triton", config=config), q, k, v
        )
        return out, vjp(g)

    return f


def kernel_resources(arch: int, shape, dtype, overrides: dict, tiling_arch: int | None = None):
    """Each kernel's resources compiled for `arch`, with `tiling_arch`'s default tiling (None:
    `arch`'s) and the overrides."""
    b, h, w, cqk, cv = shape
    config = default_config(h, w, cqk, cv, jnp.dtype(dtype).itemsize, arch if tiling_arch is None else tiling_arch)
    config = dataclasses.replace(config, **overrides)
    args = [jax.ShapeDtypeStruct((b, h, w, c), dtype) for c in (cqk, cqk, cv, cv)]
    return [compile_for_gpu(kernel, arch) for kernel in capture_triton_kernels(forward_backward(config), args)]


def _table(arch: int, overrides: dict) -> None:
    shared_memory = shared_memory_per_block(arch)
    print(f"sm_{arch} (blocks of at most {shared_memory} B of shared memory)")
    print(f"{'shape':16} {'dtype':9} {'kernel':24} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} "
          f"{'smem B':>7} {'wgmma':>6} {'mma.sync':>8} {'tcgen05':>7}  fits")
    for label, shape in SHAPES.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            for r in kernel_resources(arch, shape, dtype, overrides):
                fits = r.shared_memory_bytes <= shared_memory and r.spill_stack_bytes == 0
                print(
                    f"{label:16} {jnp.dtype(dtype).name:9} {r.name:24} {r.num_warps:5d} {r.num_stages:6d} "
                    f"{r.registers:5d} {r.spill_stack_bytes:7d} {r.shared_memory_bytes:7d} {r.wgmma:6d} "
                    f"{r.mma_sync:8d} {r.tcgen05:7d}  {'yes' if fits else 'NO'}"
                )


def _summary(archs: list[int], overrides: dict) -> None:
    print(f"{'arch':6} {'shape':16} {'dtype':9} {'own: worst spill B':>18} {'largest smem B':>14} "
          f"{'Hopper tiling: worst spill B':>28} {'largest smem B':>14}  block limit B")
    for arch in archs:
        for label, shape in SHAPES.items():
            for dtype in (jnp.float32, jnp.bfloat16):
                cells = []
                for tiling in (arch, HOPPER):
                    kernels = kernel_resources(arch, shape, dtype, overrides, tiling)
                    cells += [max(r.spill_stack_bytes for r in kernels), max(r.shared_memory_bytes for r in kernels)]
                print(f"sm_{arch:<3} {label:16} {jnp.dtype(dtype).name:9} {cells[0]:18d} {cells[1]:14d} "
                      f"{cells[2]:28d} {cells[3]:14d}  {shared_memory_per_block(arch)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in ("block_q", "block_k", "block_cv", "bwd_block_cv", "dkq_block_k", "fwd_num_warps", "fwd_num_stages",
                  "bwd_num_warps", "bwd_num_stages"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=None)
    parser.add_argument("--float32-dot", choices=FLOAT32_DOTS, default=None)
    parser.add_argument("--arch", type=int, nargs="+", default=[HOPPER],
                        help="compute capabilities as major*10+minor: 80 (A100), 86 (A10, RTX 30), 89 (L4, RTX 40), "
                             "90 (H100), 100 (B200), 120 (RTX 50)")
    parser.add_argument("--summary", action="store_true",
                        help="one line per generation, shape and dtype, against Hopper's tiling")
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("arch", "summary")}
    if args.summary:
        _summary(args.arch, overrides)
        return
    for arch in args.arch:
        _table(arch, overrides)


if __name__ == "__main__":
    main()
