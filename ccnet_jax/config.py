"""Experiment configuration as data: dataclasses, JSON files and `--set a.b=value` overrides.

A config file (experiments/configs/*.json) has the sections `model`
(`CCNetConfig` fields), `data`, `train`, `eval` and a `workdir`; every field
left out keeps its default, except `model.num_classes`, which is then the
class count of the dataset `data.name`. Overrides such as `train.steps=100` or
`eval.scales=[0.75,1,1.25]` take JSON values (bare words are strings).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

from ccnet_jax.evaluation.inference import InferenceConfig
from ccnet_jax.json_fields import FieldError, dataclass_from_json
from ccnet_jax.models import CCNetConfig
from ccnet_jax.scales import AUTHORS_SCALES

# The embedded demo's experiment (`ccnet demo`), shipped inside the package.
DEMO_CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "long_range_demo.json"

OptimizerName = Literal["sgd", "adamw"]  # the authors' SGD with momentum, or AdamW


class ConfigError(FieldError):
    """A config file or override that cannot be used; the message says what to change."""


def _require(settings: Any, section: str, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
             unit: tuple[str, ...] = ()) -> None:
    """Range checks of a settings section's numbers (each entry of a tuple field), so a bad value fails
    when the config is read instead of after compilation (a log_every of 0 divides by zero)."""
    checks = [(positive, lambda x: x > 0, "> 0"), (non_negative, lambda x: x >= 0, ">= 0"),
              (unit, lambda x: 0 <= x <= 1, "between 0 and 1")]
    for names, ok, wanted in checks:
        for name in names:
            value = getattr(settings, name)
            values = value if isinstance(value, tuple) else () if value is None else (value,)
            if isinstance(value, tuple) and not value:
                raise ConfigError(f"{section}.{name} may not be empty")
            if not all(isinstance(x, (int, float)) and ok(x) for x in values):
                raise ConfigError(f"{section}.{name} must be {wanted}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Which dataset and how its examples are augmented and batched (see ccnet_jax.data)."""

    name: str = "long_range"
    data_dir: str = "data"
    builder_config: str | None = None  # e.g. "tiny" for long_range
    train_split: str = "train"
    eval_split: str = "validation"
    crop_size: tuple[int, int] = (769, 769)
    scales: tuple[float, ...] = AUTHORS_SCALES
    scale_range: tuple[float, float] | None = None
    base_size: tuple[int, int] | None = None
    flip_prob: float = 0.5
    normalization: Literal["caffe_bgr", "imagenet_rgb"] = "caffe_bgr"
    photometric: bool = False
    eval_resize: tuple[int, int] | None = None
    num_workers: int = 0
    read_threads: int = 1

    def __post_init__(self):
        _require(self, "data", positive=("crop_size", "scales", "read_threads"), non_negative=("num_workers",))
        _require(self, "data", unit=("flip_prob",))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """lr * (1 - step / steps) ** power with SGD(momentum), weight decay added to the gradient;
    or the same schedule with AdamW (decoupled weight decay; `momentum` is its b1).
    What `ccnet_jax.train.optim.make_optimizer` reads; part of `TrainSettings`."""

    learning_rate: float = 0.01
    momentum: float = 0.9  # AdamW's b1
    weight_decay: float = 1e-4
    power: float = 0.9
    optimizer: OptimizerName = "sgd"  # the authors' SGD; adamw for short runs from scratch


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """main (OHEM or plain CE) + aux_weight * CE(aux): what `ccnet_jax.train.losses.segmentation_loss`
    reads; part of `TrainSettings`."""

    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000  # per group of ohem_images_per_group images, as the authors (per GPU)
    ohem_images_per_group: int = 2  # the authors' per-GPU batch: each group selects and averages on its own
    aux_weight: float = 0.4


@dataclasses.dataclass(frozen=True)
class TrainSettings(LossConfig, OptimizerConfig):
    """Optimisation (`OptimizerConfig`'s fields), loss (`LossConfig`'s), logging and checkpointing
    of a training run: the `train` section, each field defined once."""

    batch_size: int = 8  # global, over all devices and hosts, per optimizer step
    accumulate_steps: int = 1  # micro-batches of batch_size / accumulate_steps images per step, one at a time
    steps: int = 60_000
    seed: int = 0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    init_from: str | None = None  # a `ccnet convert` checkpoint (whole CCNet or ImageNet ResNet); "none": random
    log_every: int = 20
    checkpoint_every: int = 1000
    keep: int = 2  # most recent checkpoints kept, besides the best by validation mIoU
    eval_every: int = 0  # 0: evaluate only at the end
    async_checkpoints: bool = True

    def __post_init__(self):
        _require(self, "train", positive=("batch_size", "accumulate_steps", "steps", "learning_rate", "ohem_min_kept",
                                          "ohem_images_per_group", "log_every", "checkpoint_every", "keep"),
                 non_negative=("weight_decay", "aux_weight", "eval_every", "power", "seed"),
                 unit=("momentum", "ohem_thresh"))


@dataclasses.dataclass(frozen=True)
class EvalSettings(InferenceConfig):
    """Evaluation and prediction: the inference (`InferenceConfig`'s fields: mode, windows, scales,
    flip; the authors: 769x769 windows every 513 pixels) and how images are batched."""

    batch_size: int = 0  # global; 0 means one image per device
    pad_to: tuple[int, int] | None = None  # one image size for every batch; None: each batch's largest
    max_images: int = 0  # 0: the whole split (a smaller number evaluates a prefix, for quick checks)

    def __post_init__(self):
        super().__post_init__()
        _require(self, "eval", positive=("pad_to",), non_negative=("batch_size", "max_images"))


def _dataset_classes(name: str) -> int | None:
    """The class count of the dataset `name` (a `data.name`), None for a name no dataset has."""
    # Imported here: GPU scripts import this module on machines without grain and tensorflow-datasets.
    from ccnet_jax.data import DATASETS

    return DATASETS[name].num_classes if name in DATASETS else None


def _default_model() -> CCNetConfig:
    """The model of the default dataset's classes, as `from_dict` gives a config without
    model.num_classes (CCNetConfig's own default is the authors' 19 Cityscapes classes)."""
    return CCNetConfig(num_classes=_dataset_classes(DataSettings.name))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: CCNetConfig = dataclasses.field(default_factory=_default_model)
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    workdir: str = "runs/experiment"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": CCNetConfig, "data": DataSettings, "train": TrainSettings, "eval": EvalSettings}


def _section(cls: type, values: dict[str, Any], name: str) -> Any:
    try:
        if cls is CCNetConfig:  # it also reads the fields of configs saved by earlier versions
            return CCNetConfig.from_dict(values)
        return dataclass_from_json(cls, values, name)
    except ConfigError:
        raise
    except FieldError as err:
        raise ConfigError(str(err)) from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"section {name!r}: {err}") from err


def _with_dataset_classes(values: dict[str, Any]) -> dict[str, Any]:
    """`values` whose model section, if it leaves out num_classes, takes the class count of the dataset
    data.name names. Saved configs always hold num_classes, so they load as written; an unknown dataset
    keeps CCNetConfig's default, and is reported by whatever reads the dataset."""
    model, data = values.get("model", {}), values.get("data", {})
    name = data.get("name", DataSettings.name) if isinstance(data, dict) else None
    classes = _dataset_classes(name) if isinstance(name, str) else None
    if not isinstance(model, dict) or "num_classes" in model or classes is None:
        return values
    return {**values, "model": {**model, "num_classes": classes}}


def from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """An ExperimentConfig from nested dicts (missing fields keep their defaults; a missing
    model.num_classes is the dataset's)."""
    unknown = sorted(set(values) - set(_SECTIONS) - {"workdir"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; a config has {sorted(_SECTIONS)} and 'workdir'")
    values = _with_dataset_classes(values)
    sections = {name: _section(cls, values.get(name, {}), name) for name, cls in _SECTIONS.items()}
    workdir = values.get("workdir", ExperimentConfig.workdir)
    if not isinstance(workdir, str):
        raise ConfigError(f"workdir must be a string, got {workdir!r}")
    return ExperimentConfig(workdir=workdir, **sections)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.steps=100' -> ("train", "steps", 100); the value is JSON, or a plain string."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} needs the form section.field=value, e.g. train.steps=100")
    if key == "workdir":
        return "", "workdir", raw
    section, dot, field = key.partition(".")
    if not dot or section not in _SECTIONS:
        raise ConfigError(f"override {text!r}: the key must be workdir or one of "
                          f"{', '.join(s + '.FIELD' for s in _SECTIONS)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, field, value


def load(base: str | Path | dict[str, Any] | None, overrides: list[str] = ()) -> ExperimentConfig:
    """The one way every command reads its config: `base` (a JSON config file, a dict of the same
    form such as a run's saved config, or None for all defaults) with `section.field=value`
    overrides applied in order."""
    values: dict[str, Any] = {}
    if isinstance(base, dict):
        values = json.loads(json.dumps(base))  # a deep copy; the caller's dict stays as it was
    elif base is not None:
        path = Path(base)
        if not path.is_file():
            # Absolute paths: relative ones hold only from the repository root.
            root = Path(__file__).resolve().parents[1]
            known = [str(p) for folder in (root / "experiments" / "configs", root / "ccnet_jax" / "configs")
                     for p in sorted(folder.glob("*.json"))]
            raise ConfigError(f"config file {path} does not exist; the shipped ones are {', '.join(known)}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a JSON object of sections ({', '.join(_SECTIONS)}, workdir), "
                              f"got {type(values).__name__}")
    for text in overrides:
        section, field, value = parse_override(text)
        if section:
            values.setdefault(section, {})[field] = value
        else:
            values[field] = value
    return from_dict(values)


def save(config: ExperimentConfig, path: str | Path) -> None:
    """Writes `config` to `path` as JSON, replacing the file in one step.

    In a multi-process run every process reads WORKDIR/config.json to check a
    resume while process 0 rewrites it: written in place, another process can
    read it empty or cut short, fail alone, and leave the others waiting in
    the next collective. A rename shows readers the old file or the new one.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(partial, path)


# What a checkpoint's arrays depend on: the model (except how the op runs), the optimizer and the seed.
_RESUME_FREE_MODEL_FIELDS = ("implementation", "interpret", "remat_attention")
_RESUME_TRAIN_FIELDS = ("optimizer", "seed", "batch_size")  # each process's data share depends on the batch


def config_changes(saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """`section.field: saved -> new` for every setting of `config` that differs from `saved` (a
    config.json), allowed on resume or not; the workdir is where the run is, not a setting."""
    new = json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the saved file
    changes = []
    for section, values in new.items():
        if section == "workdir":
            continue
        if not isinstance(values, dict):
            if saved.get(section) != values:
                changes.append(f"{section}: {saved.get(section)!r} -> {values!r}")
            continue
        for name, now in values.items():
            old = saved.get(section, {}).get(name) if isinstance(saved.get(section), dict) else None
            if old != now:
                changes.append(f"{section}.{name}: {old!r} -> {now!r}")
    return changes


def resume_conflicts(saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """`section.field: saved -> new` for every field that must not change when a run resumes.

    `saved` is the workdir's config.json of the run that wrote the checkpoints.
    The model (except how the attention is computed: implementation, interpreter,
    remat), the optimizer, the seed and the global batch size must match; steps,
    learning rate, data and evaluation settings may change.
    """
    new = json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the saved file
    fields = [("model", f) for f in new["model"] if f not in _RESUME_FREE_MODEL_FIELDS]
    fields += [("train", f) for f in _RESUME_TRAIN_FIELDS]
    conflicts = []
    for section, name in fields:
        old, now = saved.get(section, {}).get(name), new[section][name]
        if old != now:
            conflicts.append(f"{section}.{name}: {old!r} -> {now!r}")
    return conflicts
