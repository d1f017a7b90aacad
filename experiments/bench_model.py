"""CCNet training-step and inference benchmark: images/s, latency and memory, per attention implementation.

Usage: python experiments/bench_model.py [--quick] [--depth 101] [--size 769] [--batch 2]
                                         [--inference-size 1024 2048] [--tables train inference] [--profile]
                                         [--dilated-convs auto space_to_batch native]
                                         [--remat-attention none projections all]

Times the training step that `ccnet train` runs (ccnet_jax.train.step: one
jitted program over the device mesh with forward, main CE + 0.4 x aux CE on
logits upsampled to the label size, backward, BatchNorm in training mode,
and the authors' SGD update), for each compute dtype and each implementation
of the criss-cross op, and for each way of computing the backbone's dilated
convs asked for (CCNetConfig.dilated_convs; the default, "auto", alone
unless --dilated-convs names more), and in training for each level of
recomputing the attention layers in the backward asked for
(CCNetConfig.remat_attention, "none" unless --remat-attention names more:
what the memory saved costs in time). Steps are issued back to back and the device is
synchronised once per round, as in training; the figure is the median over
rounds of the round's time per step, beside every round's in the order run (one H100
ran our step at 35.3-70.6 ms a round and PyTorch's at 51.0-67.0, medians 35.7 and 65.0 ms: the
order shows whether the slow rounds are the first ones). Memory is XLA's buffer assignment for
the compiled step (arguments + outputs + temporaries - donated aliases).
Inference is what serving costs: whole-image segmentation (network, logits
upsampled to the image, argmax) of one 1024x2048 Cityscapes image per call,
each call synchronised; latency is the median call, images/s its inverse.
--quick runs a narrow ResNet-50-shaped network on 97x97 crops (97x129 for
inference), as a CPU smoke test (--size, --steps, --rounds, --inference-size
and --calls given beside it are kept). The CPU figure tracked in RESULTS.md is
`--depth 50 --size 225 --batch 2 --dtypes float32 --tables train --profile`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import device_name, positive_int

from ccnet_jax.evaluation.inference import InferenceConfig, predict_logits
from ccnet_jax.models import CCNetConfig
from ccnet_jax.models.parts import split_model
from ccnet_jax.trace_times import busiest_lines, busy_times
from ccnet_jax.train.losses import LossConfig
from ccnet_jax.train.optim import OptimizerConfig, make_optimizer
from ccnet_jax.train.state import build_model, compute_dtype, init_state
from ccnet_jax.train.step import make_mesh, make_train_step
from pallas_kernels import IMPLEMENTATIONS
from pallas_kernels.criss_cross.implementations import is_hopper

BATCHES = 2  # distinct batches the steps cycle over


def unservable(error: ValueError) -> str | None:
    """Why the attention implementation cannot serve the model's feature maps (the Mosaic kernels
    take strips of at most 256 pixels; a 1024x2048 image gives 129x257 maps), or None if `error`
    is about something else."""
    _, found, reason = str(error).partition("cannot serve this input: ")
    return reason.split(". implementation=")[0] if found else None


def compiled_mib(compiled) -> float:
    """XLA's buffer assignment for a compiled program, MiB: arguments + outputs + temporaries -
    donated aliases."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def segmentation(parts):
    """Whole-image segmentation by `parts`' eval-mode network: (params, batch_stats, image
    (1, H, W, 3) float32) -> (1, H, W) class ids, logits upsampled to the image."""

    def segment(params, batch_stats, image):
        net = parts.model(params, batch_stats, train=False)
        logits = predict_logits(lambda x: net(x)[0], image, InferenceConfig())
        return jnp.argmax(logits, axis=-1)

    return segment


def measure(
    config: CCNetConfig, dtype_name: str, batch: int, size: int, steps: int, rounds: int, profile: bool = False
) -> tuple[list[float], float]:
    """(seconds per step of each round, compiled MiB) of the training step for `config`; with
    `profile`, one more step is traced and its time per kind of XLA operation printed."""
    mesh = make_mesh()
    model = build_model(config, seed=0, mesh=mesh, dtype=compute_dtype(dtype_name))
    tx = make_optimizer(OptimizerConfig(), steps=10_000)
    parts, state = init_state(model, tx, seed=0, mesh=mesh)
    step = make_train_step(parts, tx, LossConfig(), mesh)
    batches = []
    for i in range(BATCHES):
        keys = jax.random.split(jax.random.key(i), 2)
        batches.append(jax.device_put({
            "image": jax.random.normal(keys[0], (batch, size, size, 3), jnp.float32),
            "label": jax.random.randint(keys[1], (batch, size, size), 0, config.num_classes).astype(jnp.uint8),
        }, NamedSharding(mesh, PartitionSpec("data"))))
    compiled = step.lower(state, batches[0]).compile()
    mib = compiled_mib(compiled)
    for i in range(2):  # warm-up
        state, metrics = compiled(state, batches[i % BATCHES])
    jax.block_until_ready(metrics)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batches[i % BATCHES])
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / steps)
    if profile:
        print_profile(lambda: compiled(state, batches[0]))
    return times, mib


def print_profile(run) -> None:
    """Traces one call of `run` and prints the busy time of its busiest operations (the GPU's
    kernels and copies on a GPU, summed over its streams; XLA operations' thread time on the CPU;
    numbering dropped)."""
    busy = busy_times(run)
    total = sum(busy.values())
    print(f"  profile of one step: {total:.1f} ms busy")
    print("\n".join(busiest_lines(busy, 8)))


def measure_inference(config: CCNetConfig, dtype_name: str, size: tuple[int, int], calls: int) -> tuple[float, float]:
    """(median seconds per synchronised call, compiled MiB) of whole-image segmentation, batch 1."""
    model = build_model(config, seed=0, dtype=compute_dtype(dtype_name))
    parts, params, batch_stats = split_model(model)
    segment = jax.jit(segmentation(parts))
    images = [jax.random.normal(jax.random.key(i), (1, *size, 3), jnp.float32) for i in range(BATCHES)]
    compiled = segment.lower(params, batch_stats, images[0]).compile()
    mib = compiled_mib(compiled)
    for image in images:  # warm-up
        jax.block_until_ready(compiled(params, batch_stats, image))
    times = []
    for i in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batch_stats, images[i % BATCHES]))
        times.append(time.perf_counter() - start)
    return statistics.median(times), mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a narrow ResNet-50-shaped network, 97x97 crops (97x129 for inference), 1 round of "
                             "2 steps, 2 inference calls (CPU smoke test); --size, --steps, --rounds, "
                             "--inference-size and --calls given beside it are kept")
    parser.add_argument("--depth", type=int, choices=(50, 101, 152), help="ResNet depth (default 101)")
    parser.add_argument("--size", type=positive_int, help="square training crop (default 769)")
    parser.add_argument("--batch", type=positive_int, default=2, help="training images per step")
    parser.add_argument("--steps", type=positive_int, help="back-to-back steps per timed round (default 5)")
    parser.add_argument("--rounds", type=positive_int,
                        help="timed rounds (the median is reported, and every round in order; default 5)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                        help="attention implementations to time (default: every one the device runs)")
    parser.add_argument("--inference-size", type=positive_int, nargs=2, metavar=("H", "W"),
                        help="inference image (default 1024 2048)")
    parser.add_argument("--calls", type=positive_int, help="timed inference calls (the median is reported; default 10)")
    parser.add_argument("--tables", nargs="+", choices=["train", "inference"], default=["train", "inference"])
    parser.add_argument("--profile", action="store_true",
                        help="after each training row, the time per kind of XLA operation of one traced step")
    parser.add_argument("--dilated-convs", nargs="+", choices=["auto", "space_to_batch", "native"], default=["auto"],
                        help="how the backbone computes its dilated convs (rows for each)")
    parser.add_argument("--remat-attention", nargs="+", choices=["none", "projections", "all"], default=["none"],
                        help="what the attention layers recompute in the backward (training rows for each)")
    args = parser.parse_args()
    if args.quick and args.depth is not None:
        parser.error("--quick times its own narrow network, whatever --depth says; give one or the other")
    on_gpu = jax.default_backend() == "gpu"
    hopper = on_gpu and is_hopper(jax.devices()[0].device_kind)
    # The kernel None picks first, then the xla baseline: a run cut off by its time limit still
    # has the comparison that matters.
    runnable = ["mosaic", "xla", "triton"] if hopper else ["triton", "xla"] if on_gpu else ["xla"]
    implementations = args.implementations or runnable
    if unrunnable := [i for i in implementations if i not in runnable]:
        # Refused here rather than after building the model: its error would end the run at that row.
        parser.error(f"--implementations {' '.join(unrunnable)}: this {jax.default_backend()} device "
                     f"({jax.devices()[0].device_kind}) runs only {' '.join(runnable)} (triton needs a CUDA GPU, "
                     "mosaic a Hopper one)")
    if "train" in args.tables and args.batch % jax.device_count():
        parser.error(f"--batch {args.batch}: the training step splits its batch over the {jax.device_count()} "
                     f"devices here; give a multiple of {jax.device_count()}")
    shape = dict(depth=50, width=8, blocks=(1, 1, 1, 1)) if args.quick else dict(depth=args.depth or 101)
    size = args.size or (97 if args.quick else 769)
    steps = args.steps or (2 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 5)
    device = f"{device_name(jax.devices()[0])} x {jax.device_count()}"
    runs = [(d, i, c) for d in args.dtypes for c in args.dilated_convs for i in implementations]
    if "train" in args.tables:
        print(f"device: {device}; CCNet {shape}, training step, batch {args.batch}, {size}x{size}, SGD; "
              f"per step, median of {rounds} rounds of {steps} back-to-back steps")
        print(f"{'dtype':9} {'op':7} {'dilated convs':14} {'remat':11} {'step ms':>9} {'images/s':>9} {'MiB':>7} "
              f"{'each round ms':>13}")
        for (dtype_name, implementation, convs), remat in itertools.product(runs, args.remat_attention):
            config = CCNetConfig(num_classes=19, implementation=implementation, dilated_convs=convs,
                                 remat_attention=remat, **shape)
            try:
                times, mib = measure(config, dtype_name, args.batch, size, steps, rounds, args.profile)
            except ValueError as e:
                if (reason := unservable(e)) is None:
                    raise
                print(f"{dtype_name:9} {implementation:7} {convs:14} {remat:11} cannot run: {reason}", flush=True)
                continue
            seconds = statistics.median(times)
            print(f"{dtype_name:9} {implementation:7} {convs:14} {remat:11} {1e3 * seconds:9.1f} "
                  f"{args.batch / seconds:9.2f} "
                  f"{mib:7.0f} {' '.join(f'{1e3 * t:.1f}' for t in times)}", flush=True)
    if "inference" in args.tables:
        inference_size = tuple(args.inference_size or ((97, 129) if args.quick else (1024, 2048)))
        calls = args.calls or (2 if args.quick else 10)
        print(f"device: {device}; CCNet {shape}, whole-image inference, batch 1, "
              f"{inference_size[0]}x{inference_size[1]}; median of {calls} synchronised calls")
        print(f"{'dtype':9} {'op':7} {'dilated convs':14} {'latency ms':>10} {'images/s':>9} {'MiB':>7}")
        for dtype_name, implementation, convs in runs:
            config = CCNetConfig(num_classes=19, implementation=implementation, dilated_convs=convs, **shape)
            try:
                seconds, mib = measure_inference(config, dtype_name, inference_size, calls)
            except ValueError as e:
                if (reason := unservable(e)) is None:
                    raise
                print(f"{dtype_name:9} {implementation:7} {convs:14} cannot run: {reason}", flush=True)
                continue
            print(f"{dtype_name:9} {implementation:7} {convs:14} {1e3 * seconds:10.1f} {1 / seconds:9.2f} {mib:7.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
