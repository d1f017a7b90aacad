"""Criss-cross attention benchmark: pallas vs xla vs a non-local block, one table.

Usage: python experiments/bench_attention.py [--quick] [--iters N] [--shapes ...]

For each shape and dtype: forward and forward+backward time (median of
device-synchronised runs after warm-up) and peak memory of the compiled
program (XLA's buffer assignment: arguments + outputs + temporaries, for the
same jitted function on the same device), for
  pallas   the fused kernels (CUDA only; skipped elsewhere),
  xla      the jnp implementation,
  nonlocal full H·W x H·W attention in XLA with the same channels,
and the bytes-moved floor: each input read once and each output written
once, at the bandwidth of a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels import criss_cross_attention

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


def _ops():
    return {
        "pallas": lambda q, k, v: criss_cross_attention(q, k, v, implementation="pallas"),
        "xla": lambda q, k, v: criss_cross_attention(q, k, v, implementation="xla"),
        "nonlocal": nonlocal_attention,
    }


def _forward_backward(op):
    def f(q, k, v, g):
        out, vjp = jax.vjp(op, q, k, v)
        return out, vjp(g)

    return f


def _median_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _peak_mib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20


def copy_bandwidth_gbs(iters: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written."""
    x = jnp.ones((256 * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0000001)
    ms = _median_ms(copy, (x,), iters)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


def floor_ms(shape, itemsize: int, backward: bool, bandwidth_gbs: float) -> float:
    b, h, w, cqk, cv = shape
    pixels = b * h * w
    fwd = pixels * (2 * cqk + 2 * cv) * itemsize  # read q, k, v; write out
    moved = fwd
    if backward:
        # read q, k, v, out, dout, lse; write dq, dk, dv
        moved += pixels * ((2 * cqk + 3 * cv) * itemsize + 4 + (2 * cqk + cv) * itemsize)
    return moved / (bandwidth_gbs * 1e9) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, few iterations (smoke test)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    iters = 3 if args.quick else args.iters
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    bandwidth = copy_bandwidth_gbs(3 if args.quick else 20)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"copy bandwidth {bandwidth:.0f} GB/s, median of {iters} runs")
    header = f"{'shape (B,H,W,Cqk,Cv)':24} {'dtype':9} {'impl':9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak fwd+bwd MiB':>17} {'vs xla':>7}"
    print(header)
    rows = []
    for shape in shapes:
        b, h, w, cqk, cv = shape
        for dtype_name in args.dtypes:
            dtype = jnp.dtype(dtype_name)
            keys = jax.random.split(jax.random.key(0), 4)
            q = jax.random.normal(keys[0], (b, h, w, cqk), dtype)
            k = jax.random.normal(keys[1], (b, h, w, cqk), dtype)
            v = jax.random.normal(keys[2], (b, h, w, cv), dtype)
            g = jax.random.normal(keys[3], (b, h, w, cv), dtype)
            results = {}
            for name, op in _ops().items():
                if name == "pallas" and not on_gpu:
                    continue
                fwd = jax.jit(op)
                fwd_bwd = jax.jit(_forward_backward(op))
                try:
                    fwd_ms = _median_ms(fwd, (q, k, v), iters)
                    fb_ms = _median_ms(fwd_bwd, (q, k, v, g), iters)
                    peak = _peak_mib(fwd_bwd.lower(q, k, v, g).compile())
                except Exception as e:  # e.g. out of memory for the non-local block
                    print(f"{str(shape):24} {dtype_name:9} {name:9} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                results[name] = (fwd_ms, fb_ms, peak)
            for name, (fwd_ms, fb_ms, peak) in results.items():
                speedup = results["xla"][1] / fb_ms if "xla" in results else float("nan")
                line = f"{str(shape):24} {dtype_name:9} {name:9} {fwd_ms:9.3f} {fb_ms:11.3f} {peak:17.1f} {speedup:6.2f}x"
                print(line, flush=True)
                rows.append(line)
            fl = floor_ms(shape, dtype.itemsize, False, bandwidth), floor_ms(shape, dtype.itemsize, True, bandwidth)
            print(f"{str(shape):24} {dtype_name:9} {'floor':9} {fl[0]:9.3f} {fl[1]:11.3f}", flush=True)


if __name__ == "__main__":
    main()
