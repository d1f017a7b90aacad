"""CCNet training-step benchmark: images/s and peak memory, Pallas vs XLA criss-cross op.

Usage: python experiments/bench_model.py [--quick] [--depth 101] [--size 769] [--batch 2]

One jitted forward+backward step of the whole network (main CE + 0.4 x aux
CE at the output stride, BatchNorm in train mode) for each dtype and each
implementation of the op; median step time over device-synchronised runs
after warm-up, images/s, and the compiled program's memory (XLA's buffer
assignment: arguments + outputs + temporaries). --quick runs a narrow
ResNet-50-shaped network on 97x97 crops, as a CPU smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ccnet_jax.models import CCNet, CCNetConfig


@nnx.jit
def train_step(model: CCNet, images: jax.Array, labels: jax.Array):
    """Loss and parameter gradients; BatchNorm statistics update in place."""

    def loss_fn(model):
        main, aux = model(images)
        ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
        return ce(main) + 0.4 * ce(aux)

    return nnx.value_and_grad(loss_fn)(model)


def measure(config: CCNetConfig, dtype, batch: int, size: int, iters: int) -> tuple[float, float]:
    """(median step seconds, compiled peak MiB) of one training step."""
    model = CCNet(config=config, dtype=dtype, rngs=nnx.Rngs(0))
    model.train()
    keys = jax.random.split(jax.random.key(1), 2)
    images = jax.random.normal(keys[0], (batch, size, size, 3), jnp.float32)
    out = -(-size // config.output_stride)
    labels = jax.random.randint(keys[1], (batch, out, out), 0, config.num_classes)
    m = train_step.lower(model, images, labels).compile().memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20
    jax.block_until_ready(train_step(model, images, labels))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(train_step(model, images, labels))
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--size", type=int, default=769)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    implementations = ["pallas", "xla"] if on_gpu else ["xla"]
    shape = dict(depth=50, width=8, blocks=(1, 1, 1, 1)) if args.quick else dict(depth=args.depth)
    size, iters = (97, 2) if args.quick else (args.size, args.iters)
    print(f"device: {jax.devices()[0].device_kind}; CCNet {shape}, batch {args.batch}, {size}x{size}, "
          f"median of {iters} steps")
    print(f"{'dtype':9} {'op':7} {'step ms':>9} {'images/s':>9} {'peak MiB':>9}")
    for dtype_name in args.dtypes:
        for implementation in implementations:
            config = CCNetConfig(num_classes=19, implementation=implementation, **shape)
            seconds, peak = measure(config, jnp.dtype(dtype_name), args.batch, size, iters)
            print(f"{dtype_name:9} {implementation:7} {1e3 * seconds:9.1f} {args.batch / seconds:9.2f} {peak:9.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
