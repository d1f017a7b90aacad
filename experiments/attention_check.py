"""The project's main job until training lands: check the op, then benchmark it.

Usage: python experiments/attention_check.py

1. On fresh random inputs, every implementation available here (the Triton
   kernels: compiled on a CUDA GPU, interpreted on CPU; the Mosaic GPU kernels
   (float32 as float16 pairs, forward and backward): compiled on a Hopper GPU,
   interpreted on CPU; and xla) is checked
   against an independent float64 reference, values and the VJP, in
   float32, bfloat16 and float16. Prints one table; exits 1 on any failure.
2. Runs experiments/bench_attention.py (the full table on a GPU, a quick
   one on CPU).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import device_name  # noqa: E402

from pallas_kernels import criss_cross_attention  # noqa: E402
from pallas_kernels.criss_cross import testing  # noqa: E402
from pallas_kernels.criss_cross.implementations import is_hopper, mosaic_unsupported  # noqa: E402
from pallas_kernels.criss_cross.testing import SMALL_BLOCKS, random_inputs, relative_error, tolerance  # noqa: E402

SHAPE = (2, 13, 21, 8, 24)  # several 16-pixel blocks; nothing a power of two


def check() -> bool:
    on_gpu = jax.default_backend() == "gpu"
    b, h, w, cqk, cv = SHAPE
    print(f"criss-cross attention check on {device_name(jax.devices()[0])}, shape (B,H,W,Cqk,Cv)={SHAPE}")
    print(f"{'impl':16} {'dtype':9} {'rel err out':>12} {'dq':>10} {'dk':>10} {'dv':>10} {'bound':>10} "
          f"{'time s':>7}  ok")
    suffix = "" if on_gpu else " (interp)"
    implementations = {
        "triton" + suffix: {"implementation": "triton", "interpret": not on_gpu, "config": SMALL_BLOCKS},
        "xla": {"implementation": "xla"},
    }
    if not on_gpu or is_hopper(jax.devices()[0].device_kind):
        implementations["mosaic" + suffix] = {"implementation": "mosaic", "interpret": not on_gpu}
    all_ok = True
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        q, k, v, g = random_inputs(int(time.time()) % 2**31, b, h, w, cqk, cv, dtype)
        reference = (testing.dense_forward(q, k, v), *testing.dense_vjp(q, k, v, g))
        bound = tolerance(dtype, h + w + max(cqk, cv))
        for label, kwargs in implementations.items():
            if kwargs["implementation"] == "mosaic" and mosaic_unsupported(dtype, h, w, cqk):
                continue
            start = time.perf_counter()

            def run(q, k, v, g, kwargs=kwargs):
                out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, **kwargs), q, k, v)
                return (out, *vjp(g))

            got = jax.block_until_ready(jax.jit(run)(q, k, v, g))
            errors = [relative_error(x, r) for x, r in zip(got, reference)]
            ok = all(e < bound for e in errors)
            all_ok &= ok
            print(
                f"{label:16} {jnp.dtype(dtype).name:9} {errors[0]:12.2e} {errors[1]:10.2e} {errors[2]:10.2e} "
                f"{errors[3]:10.2e} {bound:10.2e} {time.perf_counter() - start:7.1f}  {'yes' if ok else 'NO'}",
                flush=True,
            )
    return all_ok


def main() -> int:
    # No options, but --help (or a mistyped option) must not start the minutes of checks.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    ok = check()
    print()
    bench = os.path.join(os.path.dirname(__file__), "bench_attention.py")
    sys.argv = [bench] + ([] if jax.default_backend() == "gpu" else ["--quick"])
    runpy.run_path(bench, run_name="__main__")
    print("\nattention check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
