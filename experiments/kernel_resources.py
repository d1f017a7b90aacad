"""Registers, spills, shared memory and matrix instructions of every Triton criss-cross kernel for sm_90, on CPU.

Usage: python experiments/kernel_resources.py [--block-q 64 --block-k 64 --block-cv 128 ...]
Lowers forward+backward at the CCNet shapes for an abstract H100, compiles
each Triton kernel with the `triton` package and prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import criss_cross_attention, default_config
from pallas_kernels.criss_cross.config import FLOAT32_DOTS, H100_SHARED_MEMORY_BYTES
from pallas_kernels.criss_cross.triton_resources import capture_triton_kernels, compile_for_gpu

SHAPES = {
    "train 2x97x97": (2, 97, 97, 64, 512),
    "eval 1x128x256": (1, 128, 256, 64, 512),
}


def forward_backward(config):
    def f(q, k, v, g):
        out, vjp = jax.vjp(
            lambda q, k, v: criss_cross_attention(q, k, v, implementation="triton", config=config), q, k, v
        )
        return out, vjp(g)

    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in ("block_q", "block_k", "block_cv", "bwd_block_cv", "dkq_block_k", "fwd_num_warps", "fwd_num_stages",
                  "bwd_num_warps", "bwd_num_stages"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=None)
    parser.add_argument("--float32-dot", choices=FLOAT32_DOTS, default=None)
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if v is not None}

    print(f"{'shape':16} {'dtype':9} {'kernel':24} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} "
          f"{'smem B':>7} {'wgmma':>6} {'mma.sync':>8}  fits")
    for label, (b, h, w, cqk, cv) in SHAPES.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            config = default_config(h, w, cqk, cv, jnp.dtype(dtype).itemsize)
            config = dataclasses.replace(config, **overrides)
            args_ = [jax.ShapeDtypeStruct((b, h, w, c), dtype) for c in (cqk, cqk, cv, cv)]
            for kernel in capture_triton_kernels(forward_backward(config), args_):
                r = compile_for_gpu(kernel)
                fits = r.shared_memory_bytes <= H100_SHARED_MEMORY_BYTES and r.spill_stack_bytes == 0
                print(
                    f"{label:16} {jnp.dtype(dtype).name:9} {r.name:24} {r.num_warps:5d} {r.num_stages:6d} "
                    f"{r.registers:5d} {r.spill_stack_bytes:7d} {r.shared_memory_bytes:7d} {r.wgmma:6d} "
                    f"{r.mma_sync:8d}  {'yes' if fits else 'NO'}"
                )


if __name__ == "__main__":
    main()
