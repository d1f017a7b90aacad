"""A converted checkpoint folder (`ccnet convert`'s output): writing it, and restoring it into a model.

Layout:

    OUT_DIR/config.json   {"format_version": 1,
                           "kind": "ccnet" | "resnet",
                           "config": CCNetConfig.to_dict() | ResNetConfig.to_dict(),
                           "source": IN, "source_format": "authors" | "imagenet-deep" | "torchvision",
                           "batch_norm_scale": "abs(weight) + 1e-5 (InPlaceABN)" | "weight",
                           "load_report": {"loaded": n, "missing": [...], "unexpected": [...],
                                           "mismatched": [...], "ignored": [...]}}
    OUT_DIR/state/        orbax StandardCheckpointer save of
                          {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}

"ccnet" checkpoints hold a whole `CCNet`; "resnet" ones (ImageNet formats) hold
the backbone, to be restored into `model.backbone` before training. In code:

    model = CCNet(19, rngs=nnx.Rngs(0))
    restore_converted(model, "OUT_DIR")   # either kind; returns config.json's dict
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATE_DIR = "state"


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
    from ccnet_jax.tree_shapes import model_mismatch

    metadata = read_metadata(directory)
    target = model
    if metadata["kind"] == "resnet" and isinstance(model, CCNet):
        target = model.backbone
    elif metadata["kind"] == "ccnet" and not isinstance(model, CCNet):
        raise ValueError(f"{directory} holds a whole CCNet; restore it into a CCNet, not a {type(model).__name__}.")
    current = _split_state(target)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), current)
    state_dir = Path(directory).absolute() / STATE_DIR
    checkpointer = ocp.StandardCheckpointer()

    def refuse_if_different(saved) -> None:
        mismatch = model_mismatch(saved, abstract)
        if mismatch is not None:
            raise ValueError(
                f"{directory} does not fit this model: {mismatch}; its configuration is {metadata['config']}."
            )

    try:
        saved = checkpointer.metadata(state_dir).item_metadata
    except Exception:  # unreadable metadata: the restore below reports the damage
        saved = None
    if saved is not None:
        # Before restoring: orbax's error for another tree lists every stored name, not the few that differ.
        refuse_if_different(saved)
    try:
        restored = checkpointer.restore(state_dir, abstract)
    except ValueError as err:
        raise ValueError(
            f"{directory} does not fit this model ({err}); its configuration is {metadata['config']}."
        ) from err
    # Orbax hands back the stored shapes even when they differ from the target's.
    refuse_if_different(restored)
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
