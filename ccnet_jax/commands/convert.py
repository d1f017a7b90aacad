"""`ccnet convert IN OUT_DIR`: PyTorch CCNet / ResNet weights -> an orbax checkpoint.

Checkpoint layout (what `restore_converted` and the training/evaluation code read):

    OUT_DIR/config.json   {"format_version": 1,
                           "kind": "ccnet" | "resnet",
                           "config": CCNetConfig.to_dict() | ResNetConfig.to_dict(),
                           "source": IN, "source_format": "authors" | "imagenet-deep" | "torchvision",
                           "load_report": {"loaded": n, "missing": [...], "unexpected": [...],
                                           "mismatched": [...], "ignored": [...]}}
    OUT_DIR/state/        orbax StandardCheckpointer save of
                          {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}

"ccnet" checkpoints hold a whole `CCNet`; "resnet" ones (ImageNet formats) hold
the backbone, to be restored into `model.backbone` before training. In code:

    model = CCNet(19, rngs=nnx.Rngs(0))
    restore_converted(model, "OUT_DIR")   # either kind; returns config.json's dict

Inputs: a `torch.save` file (`.pth`, `.pt`, `.bin`; zip or legacy format),
`.safetensors` or a `.npz` of PyTorch-named arrays, all read without torch
(`ccnet_jax.convert.read_state_dict`; nothing in a `.pth` is ever executed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATE_DIR = "state"


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


def _strip(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def infer_blocks(state_dict: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """Bottleneck blocks per stage (layer1..layer4), counted from the names."""
    counts = []
    for stage in range(1, 5):
        prefix = f"layer{stage}."
        indices = {int(_strip(n).split(".")[1]) for n in state_dict if _strip(n).startswith(prefix)}
        if not indices:
            raise ValueError(f"no {prefix}* weights in the checkpoint: is it a ResNet/CCNet state dict? "
                             "Check --format.")
        counts.append(max(indices) + 1)
    return tuple(counts)


def infer_depth(state_dict: dict[str, np.ndarray]) -> tuple[int, tuple[int, int, int, int] | None]:
    """(depth, blocks): a published depth when the block counts are one, else blocks as counted
    (depth then only names the family, 101)."""
    from ccnet_jax.models.resnet import BLOCKS_BY_DEPTH

    blocks = infer_blocks(state_dict)
    for depth, standard in BLOCKS_BY_DEPTH.items():
        if blocks == tuple(standard):
            return depth, None
    return 101, blocks


def infer_width(state_dict: dict[str, np.ndarray]) -> int:
    """The network width (64 for every published ResNet) from conv1's output channels."""
    for name, value in state_dict.items():
        if _strip(name) == "conv1.weight":
            return int(value.shape[0])
    raise ValueError("no conv1.weight in the checkpoint: is it a ResNet/CCNet state dict? Check --format.")


def infer_num_classes(state_dict: dict[str, np.ndarray]) -> int:
    """Classes from the authors' classifier `head.bottleneck.3.weight`."""
    for name, value in state_dict.items():
        if _strip(name) == "head.bottleneck.3.weight":
            return int(value.shape[0])
    raise ValueError("cannot infer the number of classes: no head.bottleneck.3.weight. Pass --num-classes.")


def _split_state(model) -> dict:
    from flax import nnx

    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }


def write_checkpoint(out_dir: Path, model, metadata: dict, *, force: bool = False) -> Path:
    """Save `model` (CCNet or ResNet) and `metadata` in the layout of this module's docstring."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    state_dir = out_dir / STATE_DIR
    config_file = out_dir / CONFIG_FILE
    if state_dir.exists() or config_file.exists():
        if not force:
            raise FileExistsError(f"{out_dir} already holds a checkpoint; pass --force to replace it.")
        shutil.rmtree(state_dir, ignore_errors=True)
        config_file.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(state_dir, _split_state(model))
    checkpointer.wait_until_finished()
    config_file.write_text(json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2) + "\n")
    return out_dir


def read_metadata(directory: Path) -> dict:
    """config.json of a converted checkpoint."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a converted checkpoint (no {CONFIG_FILE}); run `ccnet convert` first.")
    metadata = json.loads(path.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')}, this code reads {FORMAT_VERSION}.")
    return metadata


def restore_converted(model, directory: Path) -> dict:
    """Restore a converted checkpoint into `model` in place; returns its config.json dict.

    A "ccnet" checkpoint needs a CCNet of the same configuration; a "resnet"
    one goes into a ResNet, or into a CCNet's backbone (head left as is).
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from ccnet_jax.models import CCNet

    metadata = read_metadata(directory)
    target = model
    if metadata["kind"] == "resnet" and isinstance(model, CCNet):
        target = model.backbone
    elif metadata["kind"] == "ccnet" and not isinstance(model, CCNet):
        raise ValueError(f"{directory} holds a whole CCNet; restore it into a CCNet, not a {type(model).__name__}.")
    current = _split_state(target)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), current)
    try:
        restored = ocp.StandardCheckpointer().restore(Path(directory).absolute() / STATE_DIR, abstract)
    except ValueError as err:
        raise ValueError(
            f"{directory} does not fit this model ({err}); its configuration is {metadata['config']}."
        ) from err
    if jax.tree.structure(restored) != jax.tree.structure(abstract):
        raise ValueError(
            f"{directory} does not fit this model: its variables are not the model's; "
            f"its configuration is {metadata['config']}."
        )
    # Orbax hands back the stored shapes even when they differ from the target's.
    wrong = [
        f"{jax.tree_util.keystr(path)}: checkpoint {tuple(got.shape)} vs model {tuple(want.shape)}"
        for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(restored))
        if tuple(got.shape) != tuple(want.shape)
    ]
    if wrong:
        raise ValueError(
            f"{directory} does not fit this model: {len(wrong)} shape mismatches, e.g. {wrong[:3]}; "
            f"its configuration is {metadata['config']}."
        )
    for group, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(target, variable_type)
        nnx.replace_by_pure_dict(state, restored[group])
        nnx.update(target, state)
    return metadata


def build_converted(directory: Path, **kwargs):
    """A CCNet or ResNet built from a converted checkpoint's config and restored; kwargs: rngs, dtype, ..."""
    from flax import nnx

    from ccnet_jax.models import CCNet, CCNetConfig, ResNet, ResNetConfig

    metadata = read_metadata(directory)
    kwargs.setdefault("rngs", nnx.Rngs(0))
    if metadata["kind"] == "ccnet":
        model = CCNet(config=CCNetConfig.from_dict(metadata["config"]), **kwargs)
    else:
        model = ResNet(ResNetConfig.from_dict(metadata["config"]), **kwargs)
    restore_converted(model, directory)
    return model


def convert(args: argparse.Namespace) -> dict:
    """Read, map and write; returns the metadata written. Raises on any problem."""
    from flax import nnx

    from ccnet_jax.convert import FORMATS, load_torch_state_dict, read_state_dict
    from ccnet_jax.models import CCNet, CCNetConfig, ResNet, ResNetConfig

    fmt = FORMATS[args.format]
    state_dict = read_state_dict(args.input)
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
        model, state_dict, strict=not args.non_strict, ignore_prefixes=fmt.ignore_prefixes
    )
    print(f"{args.input} ({args.format}) -> {fmt.model}, depth {depth}, width {width}\n{report.summary()}")
    metadata = {
        "kind": fmt.model,
        "config": config_dict,
        "source": str(args.input),
        "source_format": args.format,
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
    except (WeightLoadError, UnsafeCheckpointError, FileNotFoundError, FileExistsError, RuntimeError,
            ValueError) as err:
        print(f"ccnet convert: {err}", file=sys.stderr)
        return 1
    return 0
