"""The `ccnet` command line: one sub-command per module in ccnet_jax.commands.

Each command module defines `register(subparsers)`, which adds its parser and
sets `func` to the function that runs it. Modules are imported only when
their command is chosen, so `ccnet data ...` never imports the model code
and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ccnet_jax.commands.train", "train CCNet (resumes from WORKDIR/checkpoints), then evaluate"),
    "eval": ("ccnet_jax.commands.eval", "evaluate a checkpoint (mIoU, per-class IoU)"),
    "predict": ("ccnet_jax.commands.predict", "write prediction and attention-map pictures"),
    "demo": ("ccnet_jax.commands.demo", "train and evaluate on the embedded dataset (CPU, no download)"),
    "data": ("ccnet_jax.commands.data", "prepare datasets (cityscapes, ade20k, the embedded long_range)"),
    "convert": ("ccnet_jax.commands.convert", "convert PyTorch CCNet/ResNet weights to an orbax checkpoint"),
    "export": ("ccnet_jax.commands.export", "export a CCNet as StableHLO (runs without this package)"),
    "benchmark": ("ccnet_jax.commands.benchmark", "run a benchmark (attention op, whole model, input pipeline)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccnet", description="CCNet in JAX/Flax.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # `--set model.blocks=[1, 1, 1, 1]` unquoted: the shell splits the list at its spaces.
        split_value = "--set" in argv and any("]" in token or "}" in token for token in unknown)
        hint = "; quote a --set value with spaces, e.g. --set 'model.blocks=[1, 1, 1, 1]'" if split_value else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
