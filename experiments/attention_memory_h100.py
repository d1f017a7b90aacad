"""Criss-cross attention's temporaries, compiled for an H100 without a GPU: one table.

Usage: PYTHONPATH=.sm90 python experiments/attention_memory_h100.py [--dtypes ...] [--shapes B,H,W,CQK,CV ...]
           [--implementations triton mosaic xla]

bench_attention.py's forward and forward+backward programs, lowered with
shardings on a compile-only H100 (pallas_kernels/criss_cross/h100_target.py:
jax's CUDA plugin in .sm90, no GPU) and compiled by XLA's GPU compiler, the
Mosaic and Triton kernels included. Prints XLA's temporaries for each
(`memory_analysis().temp_size_in_bytes`: what an implementation needs on top
of its arguments and outputs, the residuals kept for the backward included),
the figure bench_attention.py reports on a card. For the kernels' programs
it has matched the card's to 0.1 MiB; xla's own programs are compiled
differently there (115 MiB on the card against 80.5 here, float32 at
(2,97,97,64,512)), so "vs xla" compares with this target's xla.
"""

from __future__ import annotations

import os

# The CUDA plugin registers its compile-only topology only when jax does not start CUDA itself.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_attention import SHAPES, forward_backward, operations, parse_shape  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from pallas_kernels.criss_cross.h100_target import compile_only_h100_mesh  # noqa: E402
from pallas_kernels.criss_cross.implementations import mosaic_unsupported  # noqa: E402

MIB = 2**20
IMPLEMENTATIONS = ("triton", "mosaic", "xla")


def temporaries_mib(fn, args, mesh) -> float:
    """XLA's temporaries of `fn` on `args` (ShapeDtypeStructs) compiled for `mesh`'s H100."""
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args]
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        help="B,H,W,CQK,CV each (default: the four CCNet shapes)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    args = parser.parse_args()
    mesh = compile_only_h100_mesh()
    ops = operations()
    print("target: a compile-only H100 (jax's CUDA plugin); XLA's temporaries, MiB")
    print(f"{'shape (B,H,W,Cqk,Cv)':24} {'dtype':9} {'impl':7} {'temp fwd':>9} {'temp fwd+bwd':>13} {'vs xla':>7}")
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        for shape in args.shapes or SHAPES:
            b, h, w, cqk, cv = shape
            maps = [jax.ShapeDtypeStruct((b, h, w, c), dtype) for c in (cqk, cqk, cv, cv)]
            rows = {}
            for name in args.implementations:
                problem = mosaic_unsupported(dtype, h, w, cqk) if name == "mosaic" else None
                if problem is not None:
                    print(f"{str(shape):24} {dtype_name:9} {name:7} cannot run: {problem}")
                    continue
                rows[name] = (temporaries_mib(ops[name], maps[:3], mesh),
                              temporaries_mib(forward_backward(ops[name]), maps, mesh))
            for name, (fwd, fwd_bwd) in rows.items():
                ratio = fwd_bwd / rows["xla"][1] if "xla" in rows else float("nan")
                print(f"{str(shape):24} {dtype_name:9} {name:7} {fwd:9.1f} {fwd_bwd:13.1f} {ratio:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
