"""`ccnet convert IN OUT_DIR`: PyTorch CCNet / ResNet weights -> a converted checkpoint folder.

Inputs: a `torch.save` file (`.pth`, `.pt`, `.bin`; zip or legacy format),
`.safetensors` or a `.npz` of PyTorch-named arrays, all read without torch
(`ccnet_jax.convert.read_state_dict`; nothing in a `.pth` is ever executed).
The folder's layout, and reading it back, are `ccnet_jax.converted_checkpoint`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMAT_HELP = {
    "authors": "a CCNet checkpoint of the authors' code",
    "imagenet-deep": "an ImageNet ResNet with the deep stem, as MIT CSAIL's resnet101-imagenet.pth",
    "torchvision": "torchvision's ImageNet ResNet, with the 7x7 stem",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` sub-command."""
    parser = subparsers.add_parser(
        "convert",
        help="convert PyTorch CCNet/ResNet weights to an orbax checkpoint",
        description="Convert PyTorch CCNet or ImageNet ResNet weights (a torch.save .pth/.pt/.bin in the zip "
        "or legacy format, .safetensors, or .npz of PyTorch-named arrays; torch is not needed and nothing "
        "in the file is executed) into an orbax checkpoint for ccnet_jax.",
    )
    parser.add_argument("input", metavar="IN", type=Path, help="weights: .pth/.pt/.bin, .safetensors or .npz")
    parser.add_argument("output", metavar="OUT_DIR", type=Path, help="directory to write the checkpoint to")
    parser.add_argument(
        "--format",
        choices=("authors", "imagenet-deep", "torchvision"),
        default="authors",
        help="authors: a CCNet checkpoint of the authors' code (default); imagenet-deep: an ImageNet "
        "ResNet with the deep stem (MIT CSAIL resnet101-imagenet.pth); torchvision: torchvision's ResNet",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classes (authors format; default: read from the checkpoint)"
    )
    parser.add_argument(
        "--depth", type=int, choices=(50, 101, 152), default=None, help="ResNet depth (default: from the checkpoint)"
    )
    parser.add_argument("--recurrence", type=int, default=2, help="R recorded in the CCNet config (default 2)")
    parser.add_argument("--non-strict", action="store_true", help="load what matches and report the rest")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint in OUT_DIR")
    parser.set_defaults(func=run)


def convert(args: argparse.Namespace) -> dict:
    """Read, map and write; returns the metadata written. Raises on any problem."""
    from flax import nnx

    from ccnet_jax.convert import (
        FORMATS,
        guess_format,
        infer_depth,
        infer_num_classes,
        infer_width,
        load_torch_state_dict,
        read_state_dict,
    )
    from ccnet_jax.converted_checkpoint import CONFIG_FILE, STATE_DIR, write_checkpoint
    from ccnet_jax.models import CCNet, CCNetConfig, ResNet, ResNetConfig

    fmt = FORMATS[args.format]
    state_dict = read_state_dict(args.input)
    guessed = guess_format(state_dict)
    hint = "" if guessed in (None, args.format) else (
        f"\nThe names look like --format {guessed} ({FORMAT_HELP[guessed]}), not {args.format}: "
        f"pass --format {guessed}."
    )
    try:
        depth, blocks = (args.depth, None) if args.depth is not None else infer_depth(state_dict)
        width = infer_width(state_dict)
        rngs = nnx.Rngs(0)
        if fmt.model == "ccnet":
            num_classes = args.num_classes if args.num_classes is not None else infer_num_classes(state_dict)
            config = CCNetConfig(
                num_classes=num_classes, depth=depth, recurrence=args.recurrence, stem=fmt.stem, width=width,
                blocks=blocks,
            )
            model = CCNet(config=config, rngs=rngs)
            config_dict = config.to_dict()
        else:
            backbone = ResNetConfig(depth=depth, stem=fmt.stem, width=width, blocks=blocks)
            model = ResNet(backbone, rngs=rngs)
            config_dict = backbone.to_dict()
        report = load_torch_state_dict(
            model, state_dict, strict=not args.non_strict, ignore_prefixes=fmt.ignore_prefixes,
            inplace_abn=fmt.inplace_abn,
        )
    except ValueError as err:
        if hint:
            raise ValueError(f"{err}{hint}") from err
        raise
    # R is no weight: the authors publish R = 1 and R = 2 models with the same arrays.
    recurrence = (f", recurrence {args.recurrence} (not in the weights: set it with --recurrence)"
                  if fmt.model == "ccnet" else "")
    scales = ("\n  BatchNorm scales: |weight| + 1e-5, as the authors' InPlaceABN applies them"
              if fmt.inplace_abn else "")
    print(f"{args.input} ({args.format}) -> {fmt.model}, depth {depth}, width {width}{recurrence}\n"
          f"{report.summary()}{scales}{hint}")
    metadata = {
        "kind": fmt.model,
        "config": config_dict,
        "source": str(args.input),
        "source_format": args.format,
        "batch_norm_scale": "abs(weight) + 1e-5 (InPlaceABN)" if fmt.inplace_abn else "weight",
        "load_report": {
            "loaded": len(report.loaded),
            "missing": report.missing,
            "unexpected": report.unexpected,
            "mismatched": [list(m) for m in report.mismatched],
            "ignored": report.ignored,
        },
    }
    out = write_checkpoint(args.output, model, metadata, force=args.force)
    print(f"wrote {out / STATE_DIR} and {out / CONFIG_FILE}")
    return metadata


def run(args: argparse.Namespace) -> int:
    """Entry point of `ccnet convert`; 0 on success, 1 with a message on stderr otherwise."""
    from ccnet_jax.convert import WeightLoadError
    from ccnet_jax.torch_checkpoint import UnsafeCheckpointError

    try:
        convert(args)
    except (WeightLoadError, UnsafeCheckpointError, OSError, RuntimeError, ValueError) as err:
        print(f"ccnet convert: {err}", file=sys.stderr)
        return 1
    return 0
