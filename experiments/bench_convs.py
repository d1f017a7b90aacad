"""The dilated backbone's 3x3 convolutions alone: forward+backward time per dilation, dtype and way
of computing them, and the GPU kernels that run.

Usage: python experiments/bench_convs.py [--batch 2] [--size 97] [--channels 256 256] [--save-trace FILE]

CCNet-101's layer3 and layer4 run 3x3 convolutions at dilation 2 and 4 on 97x97 maps (769 crops,
output stride 8): 23 blocks at 256 channels, 3 at 512. This times one such convolution (forward,
and the gradients of its input and kernel) at dilation 1, 2 and 4, NHWC, in bfloat16 and
float32, handed to XLA as a dilated convolution ("native") and as the model computes it by default
("space_to_batch", ccnet_jax.models.atrous), and names the three busiest kernels of one traced call
with their busy time. Median of 20 synchronised calls. --save-trace keeps the trace of the
bfloat16 dilation-2 native call (cuDNN's slowest here), to check the profile reader against.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from ccnet_jax.models.atrous import conv_function
from ccnet_jax.trace_times import busy_times


def conv_step(dilation: int, convs: str):
    """jit of (x, w) -> (dx, dw) of sum(conv(x, w)^2) for a 3x3 conv padded by its dilation."""
    conv = conv_function(convs)

    def loss(x, w):
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        y = conv(x, w, (1, 1), ((dilation, dilation), (dilation, dilation)), None, (dilation, dilation), dn)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=97)
    parser.add_argument("--channels", type=int, nargs=2, default=[256, 256], metavar=("IN", "OUT"))
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--save-trace", type=Path, metavar="FILE",
                        help="copy the trace of the bfloat16 dilation-2 native call here (.trace.json.gz)")
    args = parser.parse_args()
    cin, cout = args.channels
    print(f"device: {jax.devices()[0].device_kind}; 3x3 conv forward+backward, ({args.batch}, {args.size}, "
          f"{args.size}, {cin}) -> {cout} channels; median of {args.calls} synchronised calls")
    print(f"{'dtype':9} {'dilation':>8} {'computed as':15} {'ms':>8}  busiest kernels (ms busy in one call)")
    for dtype in (jnp.bfloat16, jnp.float32):
        for dilation in (1, 2, 4):
            for convs in ("native", "space_to_batch") if dilation > 1 else ("native",):
                keys = jax.random.split(jax.random.key(dilation), 2)
                x = jax.random.normal(keys[0], (args.batch, args.size, args.size, cin), dtype)
                w = (jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.05).astype(dtype)
                step = conv_step(dilation, convs)
                jax.block_until_ready(step(x, w))
                times = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    jax.block_until_ready(step(x, w))
                    times.append(time.perf_counter() - start)
                keep = dtype == jnp.bfloat16 and dilation == 2 and convs == "native"
                busiest = busy_times(lambda: step(x, w), args.save_trace if keep else None).most_common(3)
                kernels = "; ".join(f"{name[:50]} {ms:.2f}" for name, ms in busiest)
                print(f"{jnp.dtype(dtype).name:9} {dilation:8} {convs:15} {1e3 * statistics.median(times):8.3f}  "
                      f"{kernels}", flush=True)


if __name__ == "__main__":
    main()
