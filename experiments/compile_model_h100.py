"""CCNet's training step and whole-image inference compiled for an H100 without a GPU: XLA's memory.

Usage: PYTHONPATH=.sm90 python experiments/compile_model_h100.py [--depth 101] [--size 769] [--batch 2]
           [--accumulate-steps 1 ...] [--inference-size 1024 2048] [--dtypes ...] [--implementations ...]
           [--tables train inference]

The same programs as bench_model.py (the training step of `ccnet train`,
and segmentation of one whole image), lowered with shardings on a
compile-only H100 (pallas_kernels/criss_cross/h100_target.py: jax's CUDA
plugin in .sm90, no GPU) and compiled by XLA's GPU compiler, Mosaic and
Triton kernels included. Prints, per dtype and attention implementation,
the compile time (and, for training, the micro-batches each step takes
its batch in: `train.accumulate_steps`) and XLA's buffer assignment: arguments + outputs +
temporaries - donated aliases, the figure bench_model.py reports, the
temporaries alone, the cuDNN convolutions (and how many are dilated), the
GB that XLA's own operations read and write (fusions, copies, reductions;
ccnet_jax/hlo_traffic.py; n/a for micro-batches, which run in a loop), and the Mosaic and Triton kernel calls in the
optimised program. Timings need the card itself.
"""

from __future__ import annotations

import os

# The CUDA plugin registers its compile-only topology only when jax does not start CUDA itself.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from ccnet_jax.hlo_traffic import traffic  # noqa: E402
from ccnet_jax.models import CCNetConfig  # noqa: E402
from ccnet_jax.models.parts import split_model  # noqa: E402
from ccnet_jax.train.losses import LossConfig  # noqa: E402
from ccnet_jax.train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from ccnet_jax.train.state import build_model, compute_dtype, step0_state  # noqa: E402
from ccnet_jax.train.step import make_train_step  # noqa: E402
from pallas_kernels.criss_cross.h100_target import compile_only_h100_mesh  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import compiled_mib, segmentation, unservable  # noqa: E402

MIB = 2**20


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding), tree)


def _kernel_calls(text: str) -> str:
    """How many Mosaic GPU and Triton custom calls the optimised program (its HLO text) makes:
    which kernels run."""
    counts = {name: text.count(f'custom_call_target="{target}"')
              for name, target in (("mosaic", "mosaic_gpu_v2"), ("triton", "__gpu$xla.gpu.triton"))}
    return ", ".join(f"{name} {n}" for name, n in counts.items() if n) or "none"


def _cudnn_convs(text: str) -> str:
    """The cuDNN convolutions of the optimised program (its HLO text), and how many have a dilated
    kernel (the backbone's dilated convs, when handed to XLA as such: cuDNN ran those 8x slower)."""
    convs = [line for line in text.splitlines() if 'custom_call_target="__cudnn$conv' in line]
    return f"{len(convs)} ({sum('rhs_dilate=' in line for line in convs)} dilated)"


def _xla_op_gb(text: str) -> float:
    """GB read plus written by XLA's own operations in the optimised program (its HLO text): at a
    card's bandwidth, the least time they take beside the convolutions, GEMMs and kernels."""
    return traffic(text)["xla op"].bytes / 1e9


def _memory(compiled) -> tuple[float, float]:
    """(what bench_model.py reports, the temporaries alone), MiB."""
    return compiled_mib(compiled), compiled.memory_analysis().temp_size_in_bytes / MIB


def compile_train_step(config: CCNetConfig, dtype_name: str, batch: int, size: int, mesh, accumulate_steps: int = 1):
    """The compiled training step of `config` at batch x size x size for the compile-only `mesh`, taking
    the batch in `accumulate_steps` micro-batches."""
    model = build_model(config, seed=0, mesh=mesh, dtype=compute_dtype(dtype_name))
    tx = make_optimizer(OptimizerConfig(), steps=10_000)
    parts, state = step0_state(model, tx, seed=0)
    step = make_train_step(parts, tx, LossConfig(), mesh, accumulate_steps=accumulate_steps)
    data = NamedSharding(mesh, PartitionSpec("data"))
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=data),
                  "label": jax.ShapeDtypeStruct((batch, size, size), jnp.uint8, sharding=data)}
    state_spec = _abstract(state, NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh):
        return step.lower(state_spec, batch_spec).compile()


def compile_inference(config: CCNetConfig, dtype_name: str, size: tuple[int, int], mesh):
    """The compiled whole-image segmentation (batch 1) of `config` for the compile-only `mesh`."""
    model = build_model(config, seed=0, dtype=compute_dtype(dtype_name))
    parts, params, batch_stats = split_model(model)
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (_abstract(params, replicated), _abstract(batch_stats, replicated),
            jax.ShapeDtypeStruct((1, *size, 3), jnp.float32, sharding=replicated))
    with jax.set_mesh(mesh):
        return jax.jit(segmentation(parts)).lower(*args).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--size", type=int, default=769)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulate-steps", type=int, nargs="+", default=[1],
                        help="micro-batches per training step, one program each (the batch must divide)")
    parser.add_argument("--inference-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--implementations", nargs="+", default=["triton", "mosaic", "xla"],
                        choices=["triton", "mosaic", "xla", "default"],
                        help="attention implementations; 'default' is implementation=None, whatever it picks")
    parser.add_argument("--tables", nargs="+", choices=["train", "inference"], default=["train", "inference"])
    args = parser.parse_args()
    mesh = compile_only_h100_mesh(("data",))
    for table in args.tables:
        counts = args.accumulate_steps if table == "train" else [1]
        runs = [(d, i, k) for d in args.dtypes for i in args.implementations for k in counts]
        if table == "train":
            print(f"compile-only {mesh.devices.flat[0].device_kind}: CCNet-{args.depth} training step, batch "
                  f"{args.batch}, {args.size}x{args.size}")
        else:
            print(f"compile-only {mesh.devices.flat[0].device_kind}: CCNet-{args.depth} whole-image inference, "
                  f"batch 1, {args.inference_size[0]}x{args.inference_size[1]}")
        print(f"{'dtype':9} {'op':7} {'micro':>5} {'compile s':>9} {'MiB':>7} {'temp MiB':>8} {'cuDNN convs':>16} "
              f"{'XLA ops GB':>10}  kernel calls")
        for dtype_name, implementation, count in runs:
            config = CCNetConfig(num_classes=19, implementation=None if implementation == "default" else implementation,
                                 depth=args.depth)
            started = time.perf_counter()
            try:
                if table == "train":
                    compiled = compile_train_step(config, dtype_name, args.batch, args.size, mesh, count)
                else:
                    compiled = compile_inference(config, dtype_name, tuple(args.inference_size), mesh)
            except ValueError as e:
                if (reason := unservable(e)) is None:
                    raise
                print(f"{dtype_name:9} {implementation:7} {count:5} cannot run: {reason}", flush=True)
                continue
            seconds = time.perf_counter() - started
            total, temp = _memory(compiled)
            text = compiled.as_text()  # about 13 MB for the R-101 step: rendered once
            # hlo_traffic reads the entry computation; micro-batches run in a loop's body, which it skips.
            gb = f"{_xla_op_gb(text):10.1f}" if count == 1 else f"{'n/a':>10}"
            print(f"{dtype_name:9} {implementation:7} {count:5} {seconds:9.0f} {total:7.0f} {temp:8.0f} "
                  f"{_cudnn_convs(text):>16} {gb}  {_kernel_calls(text)}", flush=True)


if __name__ == "__main__":
    main()
