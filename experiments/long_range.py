"""Does a second recurrence reach what one cannot? R = 0, 1, 2 on the embedded long_range dataset.

Every variant trains the demo config (ccnet_jax/configs/long_range_demo.json)
with the same budget, once per seed, and is evaluated the same way; only
`model.recurrence` and `train.seed` change. Reported: mean, standard deviation
and range over seeds of the mIoU over all classes, over the bars (one
criss-cross step reaches their marker: ONE_STEP_CLASSES), over the blocks
(only two steps reach their key: TWO_STEP_CLASSES) and over the cues themselves
(markers and keys, recognised locally: LOCAL_CLASSES, the control group).

    python experiments/long_range.py [--recurrences 0 1 2] [--seeds 0 1 2]
        [--set train.steps=200 ...] [--workdir DIR] [--results experiments/RESULTS.md]

Each run keeps its checkpoints in WORKDIR/r{R}_seed{S}_{steps}steps, so an
interrupted experiment resumes where it stopped. --results appends a markdown
section (command, machine, budget, table) to the given file; a run with fewer
steps than the demo or fewer than three seeds is marked there as reduced.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccnet_jax import config as config_lib  # noqa: E402
from ccnet_jax.commands.options import ensure_generated_data  # noqa: E402
from ccnet_jax.data.long_range import LOCAL_CLASSES, ONE_STEP_CLASSES, TWO_STEP_CLASSES  # noqa: E402
from ccnet_jax.evaluation.metrics import mean_iou  # noqa: E402

DEMO_CONFIG = config_lib.DEMO_CONFIG_FILE
FULL_SEEDS = (0, 1, 2)
GROUPS: dict[str, tuple[int, ...] | None] = {"all": None, "one-step (bars)": ONE_STEP_CLASSES,
                                             "two-step (blocks)": TWO_STEP_CLASSES, "local (cues)": LOCAL_CLASSES}


@dataclasses.dataclass(frozen=True)
class RunScore:
    """The evaluation of one (recurrence, seed) run."""

    recurrence: int
    seed: int
    miou: dict[str, float]  # GROUPS key -> mIoU over those classes
    seconds: float


def run_one(base: config_lib.ExperimentConfig, recurrence: int, seed: int, workdir: Path) -> RunScore:
    """Trains (or resumes) and evaluates `base` with the given recurrence and seed."""
    from ccnet_jax.train.loop import train

    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, recurrence=recurrence),
        train=dataclasses.replace(base.train, seed=seed),
        workdir=str(workdir / f"r{recurrence}_seed{seed}_{base.train.steps}steps"),
    )
    start = time.perf_counter()
    result = train(config)
    if result.interrupted or result.confusion is None:
        raise SystemExit(f"run R={recurrence} seed={seed} stopped at step {result.step}; rerun to resume")
    miou = {name: mean_iou(result.confusion, classes) for name, classes in GROUPS.items()}
    return RunScore(recurrence, seed, miou, time.perf_counter() - start)


def summary_table(scores: list[RunScore]) -> str:
    """Markdown: per recurrence, mean ± sample std (min-max) over seeds of each group's mIoU."""
    header = "| R | seeds | " + " | ".join(f"mIoU {name}" for name in GROUPS) + " | minutes per run |"
    lines = [header, "|" + "---|" * (len(GROUPS) + 3)]
    for recurrence in sorted({s.recurrence for s in scores}):
        runs = [s for s in scores if s.recurrence == recurrence]
        cells = []
        for name in GROUPS:
            values = np.array([s.miou[name] for s in runs])
            if len(values) > 1:
                cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f} ({values.min():.3f}-{values.max():.3f})")
            else:
                cells.append(f"{values[0]:.3f} (one seed)")
        minutes = np.mean([s.seconds for s in runs]) / 60
        lines.append(f"| {recurrence} | {len(runs)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines)


def per_run_table(scores: list[RunScore]) -> str:
    lines = ["| R | seed | " + " | ".join(GROUPS) + " |", "|" + "---|" * (len(GROUPS) + 2)]
    for s in scores:
        lines.append(f"| {s.recurrence} | {s.seed} | " + " | ".join(f"{s.miou[n]:.4f}" for n in GROUPS) + " |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model and core count (or the accelerator), for the record."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} x {device.device_kind}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{os.cpu_count()}-core {model} CPU"


def results_section(argv: list[str], base: config_lib.ExperimentConfig, demo: config_lib.ExperimentConfig,
                    seeds: list[int], scores: list[RunScore]) -> str:
    """The markdown section appended to RESULTS.md."""
    t, m = base.train, base.model
    budget = (f"{t.steps} steps of batch {t.batch_size} ({base.data.crop_size[0]}x{base.data.crop_size[1]} crops), "
              f"{t.optimizer} lr {t.learning_rate} poly, width {m.width}, blocks {m.blocks}; "
              f"evaluated on the first {base.eval.max_images or 'all'} {base.data.eval_split} images")
    lines = [
        "## Long-range experiment: recurrence 0, 1, 2 (embedded long_range dataset)",
        "",
        f"Command: `python experiments/long_range.py {shlex.join(argv)}`",
        f"Machine: {machine()}. Budget per run: {budget}.",
    ]
    reduced = [f"{t.steps} steps instead of the demo's {demo.train.steps}"] if t.steps < demo.train.steps else []
    reduced += [f"{len(seeds)} seed(s) instead of {len(FULL_SEEDS)}"] if len(seeds) < len(FULL_SEEDS) else []
    if reduced:
        lines.append(f"**Reduced** ({', '.join(reduced)}); the full experiment is "
                     "`python experiments/long_range.py --results experiments/RESULTS.md`.")
    lines += ["", "mIoU, mean ± standard deviation over seeds (min-max):", "", summary_table(scores), "",
              "Per run:", "", per_run_table(scores), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recurrences", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(FULL_SEEDS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override the demo config for every run, e.g. train.steps=200 (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/long_range_experiment"))
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    args = parser.parse_args(argv)

    demo = config_lib.load(DEMO_CONFIG)
    base = config_lib.load(DEMO_CONFIG, args.overrides)
    ensure_generated_data(base)
    scores = []
    for recurrence in args.recurrences:
        for seed in args.seeds:
            scores.append(run_one(base, recurrence, seed, args.workdir))
            shown = ", ".join(f"{name} {value:.4f}" for name, value in scores[-1].miou.items())
            print(f"R={recurrence} seed={seed}: mIoU {shown}", flush=True)
    print(summary_table(scores))
    if args.results is not None:
        with args.results.open("a") as out:
            out.write("\n" + results_section(argv, base, demo, args.seeds, scores))
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
