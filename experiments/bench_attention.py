"""Criss-cross attention benchmark: the implementations vs a non-local block, one table.

Usage: python experiments/bench_attention.py [--quick] [--iters N] [--calls N] [--dtypes D ...]
                                            [--shapes B,H,W,CQK,CV ...]
(or `ccnet benchmark attention ...`)

For each shape and dtype: forward and forward+backward time per call and the
temporaries of the compiled program, for
  triton   the Triton kernels (CUDA only; skipped elsewhere),
  mosaic   the Mosaic GPU kernels (Hopper GPUs; float32 as float16 pairs, forward and
           backward, at maps whose strips they hold: 97x97, not 128x256),
  xla      the jnp implementation,
  nonlocal full H·W x H·W attention in XLA with the same channels,
and the bytes-moved floor: each input read once and each output written
once, at the bandwidth of a measured device-to-device copy.

Time: `--calls` calls are issued back to back, cycling over several input
sets (so that no call finds its inputs in L2), and the device is synchronised
once at the end; the figure is the median over `--iters` such rounds of the
round's time divided by its calls. One synchronisation per call would add
tens of microseconds of host round trip to programs of 0.1-1 ms.
Memory: XLA's temporaries of the forward+backward program (the residuals
kept for the backward included), i.e. what the implementation needs on top
of its arguments and outputs, which are the same for every implementation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import device_name, positive_int

from pallas_kernels import criss_cross_attention
from pallas_kernels.criss_cross.implementations import is_hopper, mosaic_unsupported

SHAPES = [
    (2, 97, 97, 64, 512),
    (8, 97, 97, 64, 512),
    (2, 65, 129, 64, 512),
    (1, 128, 256, 64, 512),
]
QUICK_SHAPES = [(1, 33, 33, 16, 64)]


def nonlocal_attention(q, k, v):
    """Embedded-Gaussian non-local aggregation over all H·W pixels (float32 softmax)."""
    b, h, w, c = q.shape
    qf = q.reshape(b, h * w, c).astype(jnp.float32)
    kf = k.reshape(b, h * w, c).astype(jnp.float32)
    vf = v.reshape(b, h * w, -1).astype(jnp.float32)
    a = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", qf, kf), axis=-1)
    return jnp.einsum("bnm,bmc->bnc", a, vf).reshape(v.shape).astype(v.dtype)


def operations() -> dict:
    """The benchmarked ops by name, each (q, k, v) -> out, NHWC."""
    return {
        "triton": lambda q, k, v: criss_cross_attention(q, k, v, implementation="triton"),
        "mosaic": lambda q, k, v: criss_cross_attention(q, k, v, implementation="mosaic"),
        "xla": lambda q, k, v: criss_cross_attention(q, k, v, implementation="xla"),
        "nonlocal": nonlocal_attention,
    }


def forward_backward(op):
    """(q, k, v, dout) -> (out, (dq, dk, dv)): `op` and its VJP in one program."""
    def f(q, k, v, g):
        out, vjp = jax.vjp(op, q, k, v)
        return out, vjp(g)

    return f


INPUT_SETS = 4


def per_call_ms(fn, arg_sets, iters: int, calls: int) -> float:
    """Median over `iters` rounds of (round time / calls); `calls` back-to-back calls a round."""
    jax.block_until_ready([fn(*args) for args in arg_sets])  # compile + warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        outs = [fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / calls)
        del outs
    return 1e3 * statistics.median(times)


def _temporaries_mib(compiled) -> float:
    m = compiled.memory_analysis()
    return float("nan") if m is None else m.temp_size_in_bytes / 2**20


def copy_bandwidth_gbs(iters: int = 10) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written."""
    arg_sets = [(jnp.full((256 * 2**20 // 4,), float(i), jnp.float32),) for i in range(2)]
    copy = jax.jit(lambda x: x * 1.0000001)
    ms = per_call_ms(copy, arg_sets, iters, calls=10)
    return 2 * arg_sets[0][0].nbytes / (ms * 1e-3) / 1e9


def floor_ms(shape, itemsize: int, backward: bool, bandwidth_gbs: float) -> float:
    b, h, w, cqk, cv = shape
    pixels = b * h * w
    fwd = pixels * (2 * cqk + 2 * cv) * itemsize  # read q, k, v; write out
    moved = fwd
    if backward:
        # read q, k, v, out, dout, lse; write dq, dk, dv
        moved += pixels * ((2 * cqk + 3 * cv) * itemsize + 4 + (2 * cqk + cv) * itemsize)
    return moved / (bandwidth_gbs * 1e9) * 1e3


def parse_shape(text: str) -> tuple[int, ...]:
    """An argparse type: "B,H,W,CQK,CV" -> five positive ints."""
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 5 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected five positive integers B,H,W,CQK,CV, e.g. 2,97,97,64,512")
    return parts


def random_arguments(seed: int, shape, dtype) -> tuple[jax.Array, ...]:
    """(q, k, v, dout) drawn from N(0, 1) for a (B, H, W, Cqk, Cv) shape."""
    b, h, w, cqk, cv = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (b, h, w, cqk), dtype), jax.random.normal(keys[1], (b, h, w, cqk), dtype),
            jax.random.normal(keys[2], (b, h, w, cv), dtype), jax.random.normal(keys[3], (b, h, w, cv), dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one tiny shape, 2 rounds of 2 calls (smoke test); --shapes, --iters and --calls "
                             "given beside it are kept")
    parser.add_argument("--iters", type=positive_int, help="timed rounds (the median is reported; default 10)")
    parser.add_argument("--calls", type=positive_int, help="back-to-back calls per round (default 20)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        help="B,H,W,CQK,CV each (default: the four CCNet shapes)")
    args = parser.parse_args()
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    iters = args.iters or (2 if args.quick else 10)
    calls = args.calls or (2 if args.quick else 20)
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    hopper = on_gpu and is_hopper(device.device_kind)
    bandwidth = copy_bandwidth_gbs(2 if args.quick else 10)
    print(f"device: {device_name(device)} ({jax.default_backend()}), jax {jax.__version__}, "
          f"copy bandwidth {bandwidth:.0f} GB/s; per call, median of {iters} rounds of {calls} "
          f"back-to-back calls over {INPUT_SETS} input sets")
    header = (f"{'shape (B,H,W,Cqk,Cv)':24} {'dtype':9} {'impl':9} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'temp fwd+bwd MiB':>17} {'vs xla':>7} {'floor/fb':>8}")
    print(header)
    # The dtype outermost: a run cut off by its time limit has the first dtype at every shape.
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        for shape in shapes:
            arg_sets = [random_arguments(seed, shape, dtype) for seed in range(INPUT_SETS)]
            floors = (floor_ms(shape, dtype.itemsize, False, bandwidth),
                      floor_ms(shape, dtype.itemsize, True, bandwidth))
            results = {}
            for name, op in operations().items():
                if name == "triton" and not on_gpu:
                    continue
                if name == "mosaic" and not (hopper and mosaic_unsupported(dtype, *shape[1:4]) is None):
                    continue
                try:
                    # Compiled once each, ahead of time: the forward+backward program that is
                    # timed is the one whose temporaries are reported.
                    fwd = jax.jit(op).lower(*arg_sets[0][:3]).compile()
                    fwd_bwd = jax.jit(forward_backward(op)).lower(*arg_sets[0]).compile()
                    fwd_ms = per_call_ms(fwd, [a[:3] for a in arg_sets], iters, calls)
                    fb_ms = per_call_ms(fwd_bwd, arg_sets, iters, calls)
                    temp = _temporaries_mib(fwd_bwd)
                except Exception as e:  # e.g. out of memory for the non-local block
                    print(f"{str(shape):24} {dtype_name:9} {name:9} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                results[name] = (fwd_ms, fb_ms, temp)
            for name, (fwd_ms, fb_ms, temp) in results.items():
                speedup = results["xla"][1] / fb_ms if "xla" in results else float("nan")
                print(f"{str(shape):24} {dtype_name:9} {name:9} {fwd_ms:9.3f} {fb_ms:11.3f} {temp:17.1f} "
                      f"{speedup:6.2f}x {floors[1] / fb_ms:8.2f}", flush=True)
            print(f"{str(shape):24} {dtype_name:9} {'floor':9} {floors[0]:9.3f} {floors[1]:11.3f}", flush=True)


if __name__ == "__main__":
    main()
