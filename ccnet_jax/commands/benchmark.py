"""`ccnet benchmark attention|model|input [ARGS ...]`: run a benchmark script of experiments/.

    attention  experiments/bench_attention.py  criss-cross op: triton, mosaic, xla, non-local
    model      experiments/bench_model.py      whole-network training step: images/s, memory
    input      experiments/bench_input.py      input pipeline: images/s per worker

Everything after the benchmark's name goes to its script unchanged, e.g.
`ccnet benchmark model --quick`; `ccnet benchmark attention --help` lists its options.
The scripts live in the repository, next to the package (an editable install).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from ccnet_jax.commands import options

SCRIPTS: dict[str, str] = {"attention": "bench_attention.py", "model": "bench_model.py", "input": "bench_input.py"}
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("benchmark", help="run a benchmark (attention op, whole model, input pipeline)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(SCRIPTS), help="what to benchmark")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    parser.set_defaults(func=run)


def run_script(path: Path, script_args: list[str]) -> int:
    """Runs `path` as __main__ with sys.argv = [path, *script_args]; its exit status (0 if it returns)."""
    saved = sys.argv
    sys.argv = [str(path), *script_args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)  # what the interpreter prints for sys.exit("message")
        return 1
    finally:
        sys.argv = saved
    return 0


def run(args: argparse.Namespace) -> int:
    path = EXPERIMENTS / SCRIPTS[args.which]
    if not path.is_file():
        return options.fail(FileNotFoundError(
            f"{path} not found: the benchmarks are scripts of the repository's experiments/ folder; "
            "run them from a checkout with the package installed editable (pip install -e .)"))
    return run_script(path, args.script_args)
