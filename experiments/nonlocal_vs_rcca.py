"""What RCCA (R = 1, 2, 3) and a non-local block add over the same network without attention.

For a 1x3x769x769 input (97x97x2048 features at output stride 8): GFLOPs from
XLA's cost analysis and peak bytes from XLA's memory analysis (arguments +
outputs + temporaries - aliases) of the compiled inference and training
(forward + backward) programs, built from abstract inputs so nothing large
is allocated; for training also the activations autodiff saves for the
backward pass (the residuals of jax.vjp) and, among them, the criss-cross
attention maps that the fused Pallas kernel does not keep. On a GPU it also
runs each program and reads the device's peak memory, one subprocess per
program so that peaks do not mix, and adds the Pallas kernel beside the
XLA op.

Scope "full" compiles the whole CCNet-101 (about 40 s per variant on two
CPU cores); scope "head" (default) the RCCA head alone on the 97x97x2048
features, which gives the same increments since the backbone is the same in
every variant (the head's training program also takes the gradient w.r.t.
the features, as backpropagation into the backbone needs).

On a machine without a GPU the fused variants do not compile for the CPU,
so their compiled figures read n/a; with --h100 every program is compiled
for a compile-only H100 instead (jax's CUDA plugin in .sm90, as
experiments/compile_model_h100.py does: PYTHONPATH=.sm90), so that XLA's
peak is the GPU compiler's, for every variant (GFLOPs then read n/a: a
compile-only device gives no cost analysis).

    python experiments/nonlocal_vs_rcca.py [--scope head|full] [--markdown] [--h100]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# XLA:CPU's YNNPACK fusions run whole dot chains (a non-local block's energies,
# softmax and aggregation) in private scratch that its memory analysis does
# not count; without them the buffers are assigned, and counted, as on a GPU.
NO_YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type="
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {NO_YNN_FUSION}".strip()
if "--h100" in sys.argv:
    # The CUDA plugin registers its compile-only topology only when jax does not start CUDA itself.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_common import positive_int  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from ccnet_jax.models import AttentionOp, CCNet, CCNetConfig, RCCAHead  # noqa: E402
from pallas_kernels.criss_cross.h100_target import compile_only_h100_mesh  # noqa: E402

MIB = 2**20
# The CCNet paper's increments over the ResNet-101 baseline at 1x3x769x769 (GFLOPs, MB).
PAPER = {"R=1": (8.3, 53), "R=2": (16.5, 127), "R=3": (24.7, 208), "non-local": (108, 1411)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One network: attention "none" | "cca" | "nonlocal", R, the CCA op's implementation, remat."""

    name: str
    attention: str
    recurrence: int = 0
    implementation: str = "xla"
    remat: str = "none"

    @property
    def fused(self) -> bool:
        return self.implementation != "xla"


@dataclasses.dataclass(frozen=True)
class Setup:
    scope: str = "head"
    size: int = 769
    batch: int = 1
    num_classes: int = 19

    @property
    def feature_size(self) -> int:
        return abstract_ccnet_output(self.size)


@functools.lru_cache
def abstract_ccnet_output(size: int) -> int:
    """Side of CCNet's output map for a size x size input (769 -> 97)."""
    model = nnx.eval_shape(lambda: CCNet(19, depth=50, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    main, _ = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )
    return main.shape[1]


def variants() -> list[Variant]:
    out = [Variant("baseline", "none")]
    out += [Variant(f"R={r}", "cca", r) for r in (1, 2, 3)]
    out.append(Variant("non-local", "nonlocal"))
    out += [
        Variant("R=2 triton", "cca", 2, "triton"),
        Variant("R=2 triton remat", "cca", 2, "triton", remat="projections"),
        Variant("R=2 triton remat all", "cca", 2, "triton", remat="all"),
    ]
    return out


def on_cuda_or_abstract_h100():
    """A context in which the fused ops trace as on an H100 when no GPU is here (nothing compiles)."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def build(variant: Variant, setup: Setup, abstract: bool = True) -> nnx.Module:
    def make():
        if setup.scope == "full":
            config = CCNetConfig(
                num_classes=setup.num_classes,
                recurrence=variant.recurrence,
                attention=variant.attention,
                implementation=variant.implementation,
                remat_attention=variant.remat,
            )
            return CCNet(config=config, rngs=nnx.Rngs(0))
        return RCCAHead(
            2048,
            512,
            setup.num_classes,
            recurrence=variant.recurrence,
            attention=variant.attention,
            attention_fn=AttentionOp(variant.implementation),
            remat_attention=variant.remat,
            rngs=nnx.Rngs(0),
        )

    return nnx.eval_shape(make) if abstract else make()


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def programs(model: nnx.Module, setup: Setup):
    """(inference, its abstract args), (train_step, its abstract args), saved_for_backward.

    train_step: loss (CE main + 0.4 CE aux for the full net) at the logits'
    resolution, gradients w.r.t. the parameters (and the features for the
    head), updated BN statistics. Label upsampling and the optimizer update
    are the same in every variant and left out.
    """
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    graphdef_eval, state_eval = nnx.split(model)
    head = setup.scope == "head"

    def inference(state, x):
        return nnx.merge(graphdef_eval, state)(x)

    def train_step(params, rest, x, labels):
        module = nnx.merge(graphdef_train, params, rest)

        def loss_fn(module, x):
            out = module(x)
            if head:
                return _cross_entropy(out, labels)
            return _cross_entropy(out[0], labels) + 0.4 * _cross_entropy(out[1], labels)

        argnums = (nnx.DiffState(0, nnx.Param), 1) if head else nnx.DiffState(0, nnx.Param)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=argnums)(module, x)
        return loss, grads, nnx.state(module, nnx.BatchStat)

    def saved_for_backward(params, rest, x, labels):
        """The residuals autodiff keeps from the forward pass for the backward one."""

        def loss_of(params, x):
            module = nnx.merge(graphdef_train, params, jax.tree.map(lambda a: a, rest))
            out = module(x)
            return _cross_entropy(out, labels) if head else _cross_entropy(out[0], labels)

        return jax.vjp(loss_of, params, x)[1]

    h = setup.feature_size
    if head:
        x = jax.ShapeDtypeStruct((setup.batch, h, h, 2048), jnp.float32)
    else:
        x = jax.ShapeDtypeStruct((setup.batch, setup.size, setup.size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((setup.batch, h, h), jnp.int32)
    return (inference, (state_eval, x)), (train_step, (params, rest, x, labels)), saved_for_backward


def analyse(fn, args, mesh=None) -> dict:
    """GFLOPs and bytes of the compiled program (XLA's own accounting); compiled for the devices
    of `mesh` (a compile-only H100's) when given, else for the default backend."""
    if mesh is None:
        compiled = jax.jit(fn).lower(*args).compile()
    else:
        replicated = NamedSharding(mesh, PartitionSpec())
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), args)
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    # A compile-only device gives no cost analysis.
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {
        "gflops": cost.get("flops", float("nan")) / 1e9,
        "temp_mib": memory.temp_size_in_bytes / MIB,
        "total_mib": total / MIB,
    }


def analyse_saved(saved_for_backward, args, setup: Setup) -> dict:
    """MiB of the residuals autodiff keeps for the backward pass, and of those the attention maps.

    Attention maps: the (B, H, W, H | W | H+W) energies and probabilities of
    the XLA criss-cross op, which the Pallas kernel replaces by a (B, H, W)
    log-sum-exp.
    """
    h = setup.feature_size
    with on_cuda_or_abstract_h100():
        leaves = jax.tree.leaves(jax.eval_shape(saved_for_backward, *args))
    size = lambda leaf: leaf.size * leaf.dtype.itemsize / MIB  # noqa: E731
    maps = [a for a in leaves if a.ndim == 4 and a.shape[:3] == (setup.batch, h, h) and a.shape[3] in (h, 2 * h)]
    return {"saved_mib": sum(size(leaf) for leaf in leaves), "maps_mib": sum(size(leaf) for leaf in maps)}


def measure_gpu_peak(variant: Variant, setup: Setup, mode: str) -> float:
    """Run one program on the GPU and return the device's peak bytes in use (MiB)."""
    model = build(variant, setup, abstract=False)
    (inference, infer_args), (train_step, train_args), _ = programs(model, setup)
    fn, args = (inference, infer_args) if mode == "inference" else (train_step, train_args)
    # The model's state is real; the images/features and labels are zeros of the abstract shapes.
    concrete = [jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a for a in args]
    compiled = jax.jit(fn).lower(*concrete).compile()
    jax.block_until_ready(compiled(*concrete))
    return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / MIB


def gpu_peak_in_subprocess(variant: Variant, setup: Setup, mode: str) -> float:
    request = json.dumps({"variant": dataclasses.asdict(variant), "setup": dataclasses.asdict(setup), "mode": mode})
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run(
        [sys.executable, __file__, "--child", request], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"GPU measurement of {variant.name} ({mode}) failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _cell(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    # --h100 is read from sys.argv before jax starts, so it must be spelt out.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--scope", choices=("head", "full"), default="head")
    parser.add_argument("--size", type=positive_int, default=769, help="input crop (769)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table for RESULTS.md")
    parser.add_argument("--variants", help="comma-separated subset, e.g. baseline,R=2 (default: all)")
    parser.add_argument("--h100", action="store_true",
                        help="compile every program for a compile-only H100 (PYTHONPATH=.sm90; no GPU needed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        request = json.loads(args.child)
        peak = measure_gpu_peak(Variant(**request["variant"]), Setup(**request["setup"]), request["mode"])
        print(peak)
        return 0

    setup = Setup(scope=args.scope, size=args.size)
    on_gpu = jax.default_backend() == "gpu"
    try:
        mesh = compile_only_h100_mesh(("x",)) if args.h100 else None
    except RuntimeError as e:  # says what to install or set
        parser.error(f"--h100: {e}")
    h = setup.feature_size
    target = (f"{jax.default_backend()} ({jax.devices()[0].device_kind})" if mesh is None
              else "a compile-only NVIDIA H100")
    print(f"programs for {target}, scope {setup.scope}, "
          f"input 1x3x{setup.size}x{setup.size} -> features {h}x{h}x2048, XLA_FLAGS={os.environ['XLA_FLAGS']}",
          file=sys.stderr)
    chosen = variants()
    if args.variants:
        names = args.variants.split(",")
        chosen = [v for v in chosen if v.name in names]
        if "baseline" not in names or len(chosen) != len(names):
            parser.error(f"--variants: give baseline and any of {[v.name for v in variants()]}")
    rows = {}
    for variant in chosen:
        start = time.perf_counter()
        model = build(variant, setup)
        (inference, infer_args), (train_step, train_args), saved = programs(model, setup)
        if variant.fused and not on_gpu and mesh is None:  # the fused kernels compile for CUDA only
            row = {mode: dict.fromkeys(("gflops", "temp_mib", "total_mib"), float("nan"))
                   for mode in ("inference", "train")}
        else:
            row = {"inference": analyse(inference, infer_args, mesh), "train": analyse(train_step, train_args, mesh)}
        row["train"].update(analyse_saved(saved, train_args, setup))
        if on_gpu:
            for mode in ("inference", "train"):
                row[mode]["gpu_peak_mib"] = gpu_peak_in_subprocess(variant, setup, mode)
        rows[variant.name] = row
        print(f"  {variant.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    base = rows["baseline"]
    gpu = [("gpu_peak_mib", "GPU peak MiB")] if on_gpu else []
    metrics = {
        "inference": [("gflops", "GFLOPs"), ("total_mib", "XLA peak MiB"), *gpu],
        "train": [("gflops", "GFLOPs"), ("total_mib", "XLA peak MiB"), *gpu,
                  ("saved_mib", "saved act. MiB"), ("maps_mib", "of which CCA attention maps")],
    }
    header = ["variant", "paper GFLOPs / MB"]
    for mode, keys in metrics.items():
        header += [f"{mode} +{label}" for _, label in keys]
    table = []
    for name, row in rows.items():
        if name == "baseline":
            continue
        paper = PAPER.get(name.split(" ")[0])
        cells = [name, f"{paper[0]} / {paper[1]}" if paper and " " not in name else ""]
        for mode, keys in metrics.items():
            cells += [_cell(row[mode][key] - base[mode][key]) for key, _ in keys]
        table.append(cells)
    base_cells = ["baseline (absolute)", ""]
    for mode, keys in metrics.items():
        base_cells += [_cell(base[mode][key]) for key, _ in keys]
    table.append(base_cells)

    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in table:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
        for cells in [header, *table]:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))

    if "non-local" in rows and "R=2" in rows:
        nl, r2 = rows["non-local"], rows["R=2"]
        for mode, keys in metrics.items():
            ratios = []
            for key, label in keys[1:]:
                if key == "maps_mib":
                    continue
                d_nl, d_r2 = nl[mode][key] - base[mode][key], r2[mode][key] - base[mode][key]
                ratios.append(f"{label} +{d_nl:.1f} vs +{d_r2:.1f} ({d_nl / d_r2:.1f}x)")
            d_nl, d_r2 = nl[mode]["gflops"] - base[mode]["gflops"], r2[mode]["gflops"] - base[mode]["gflops"]
            fewer = f"{100 * (1 - d_r2 / d_nl):.1f}% fewer FLOPs, " if d_nl == d_nl else ""  # n/a: no cost analysis
            print(f"{mode}: R=2 vs non-local: {fewer}" + ", ".join(ratios))
        d_nl = nl["train"]["saved_mib"] - base["train"]["saved_mib"]
        for name in ("R=2 triton", "R=2 triton remat", "R=2 triton remat all"):
            if name in rows:
                d_fused = rows[name]["train"]["saved_mib"] - base["train"]["saved_mib"]
                line = f"train, {name}: saved act. +{d_fused:.1f} MiB, {d_nl / d_fused:.1f}x less than non-local"
                peak_nl = nl["train"]["total_mib"] - base["train"]["total_mib"]
                peak_fused = rows[name]["train"]["total_mib"] - base["train"]["total_mib"]
                if peak_fused == peak_fused:  # compiled (not n/a)
                    line += f"; XLA peak +{peak_fused:.1f} MiB, {peak_nl / peak_fused:.1f}x less"
                print(line)
    energies = setup.batch * h * h * (h + h) * 4 / MIB
    print(f"one B*H*W*(H+W) float32 energy map: {energies:.2f} MiB per CCA application; the Pallas kernel "
          f"keeps a B*H*W log-sum-exp instead: {setup.batch * h * h * 4 / MIB:.3f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
