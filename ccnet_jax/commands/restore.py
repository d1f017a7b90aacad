"""Finding the weights for eval/predict: a training run's folder or a `ccnet convert` checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ccnet_jax.config import ExperimentConfig, from_dict


def is_converted(path: Path) -> bool:
    """True for a `ccnet convert` output folder (config.json with a format_version)."""
    config_file = path / "config.json"
    return config_file.is_file() and "format_version" in json.loads(config_file.read_text())


def locate(path: Path) -> tuple[Path, Path, int | None]:
    """(the run's workdir, its checkpoints folder, a step or None for the newest) for --checkpoint
    given as a workdir, as WORKDIR/checkpoints, or as one step's folder WORKDIR/checkpoints/STEP."""
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent.parent, path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, path / "checkpoints", None
    if path.name == "checkpoints":
        return path.parent, path, None
    return path, path, None


def run_config(path: Path) -> ExperimentConfig | None:
    """The config a training run saved in its workdir, for `path` as `locate` takes it, if any."""
    workdir = locate(path)[0]
    config_file = workdir / "config.json"
    if config_file.is_file() and not is_converted(workdir):
        return from_dict(json.loads(config_file.read_text()))
    return None


# Datasets a converted model's class count identifies (the authors' models are Cityscapes ones).
_DATASETS_BY_CLASSES = {19: "cityscapes", 150: "ade20k"}


def converted_config(path: Path) -> dict:
    """Config values for a `ccnet convert` folder used without --config: its model, and the dataset its
    class count identifies (19: cityscapes, 150: ade20k)."""
    metadata = json.loads((path / "config.json").read_text())
    if metadata.get("kind") != "ccnet":
        raise ValueError(f"{path} holds a backbone (ResNet) only, which cannot segment: convert a whole CCNet, "
                         "or train one with --set train.init_from=" + str(path))
    model = metadata["config"]
    dataset = _DATASETS_BY_CLASSES.get(model.get("num_classes"))
    # Another class count keeps the default data settings (the authors' normalisation, whole-image
    # inference); pictures then get generated colours.
    return {"model": model, "data": {"name": dataset}} if dataset else {"model": model}


def load_weights(config: ExperimentConfig, checkpoint: Path, mesh):
    """(model parts, state) with the weights of `checkpoint`: a converted folder, a run's workdir or
    its `checkpoints` folder (the newest restorable checkpoint there), or one step's folder."""
    from ccnet_jax.train.checkpoint import restore_params
    from ccnet_jax.train.loop import build_state

    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass a training run's workdir "
                                "or a `ccnet convert` output folder")
    if is_converted(checkpoint):
        parts, state, _ = build_state(config, mesh, init_from=str(checkpoint))
        return parts, state
    parts, state, _ = build_state(config, mesh)
    _, folder, step = locate(checkpoint)
    params, batch_stats, _, step = restore_params(folder, state, step)
    print(f"weights: {folder / str(step)} (step {step})", file=sys.stderr)
    return parts, state.replace(params=params, batch_stats=batch_stats)
