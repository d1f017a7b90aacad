"""The training run: build, resume, step, log, evaluate, checkpoint (also on SIGTERM)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ccnet_jax.config import ConfigError, ExperimentConfig, TrainSettings, config_changes, resume_conflicts
from ccnet_jax.config import save as save_config
from ccnet_jax.data import dataset_spec
from ccnet_jax.data.long_range import TWO_STEP_CLASSES
from ccnet_jax.evaluation import attention
from ccnet_jax.evaluation.evaluate import evaluate, local_rows, make_predict_fn
from ccnet_jax.evaluation.metrics import class_iou, mean_iou
from ccnet_jax.evaluation.pictures import EvaluatedImage, attention_picture, evaluated_image, prediction_picture
from ccnet_jax.evaluation.writers import palette_for
from ccnet_jax.preemption import EvaluationStopped, Preemption
from ccnet_jax.train import inputs
from ccnet_jax.train.checkpoint import Checkpoints
from ccnet_jax.train.data_position import gather_position, local_position
from ccnet_jax.train.optim import make_optimizer, poly_schedule
from ccnet_jax.train.progress import Progress
from ccnet_jax.train.state import ModelParts, TrainState, build_model, compute_dtype, init_state
from ccnet_jax.train.step import make_mesh, make_train_step

# Pixels of these classes show what attention carries (the demo's two-step blocks).
_PREFERRED_PIXELS = {"long_range": TWO_STEP_CLASSES}


@dataclasses.dataclass
class RunResult:
    step: int
    confusion: np.ndarray | None  # of the final evaluation (None if it was skipped)
    miou: float | None
    interrupted: bool
    stopped_by: str = "SIGTERM"  # with interrupted: what asked for the stop ("SIGTERM" or "Ctrl-C")


def build_state(
    config: ExperimentConfig, mesh: jax.sharding.Mesh, *, init_from: str | None = None
) -> tuple[ModelParts, TrainState, Any]:
    """(model parts, step-0 state, optax transformation) for `config`, optionally from converted weights."""
    model = build_model(config.model, seed=config.train.seed, mesh=mesh,
                        dtype=compute_dtype(config.train.compute_dtype))
    if init_from and init_from != NO_INITIALISATION:
        from ccnet_jax.converted_checkpoint import restore_converted

        path = Path(init_from)
        if not path.exists():
            raise FileNotFoundError(f"train.init_from {path} does not exist; pass a `ccnet convert` output folder, "
                                    f"or {NO_INITIALISATION} to train from random weights")
        if (path / "checkpoints").is_dir():  # its config.json is an experiment's, which reads as a wrong version
            raise ConfigError(f"train.init_from {path} is a training run's workdir, not a `ccnet convert` output "
                              f"folder; to continue that run, train with --workdir {path}")
        restore_converted(model, path)
    tx = make_optimizer(config.train, config.train.steps)
    parts, state = init_state(model, tx, seed=config.train.seed, mesh=mesh)
    return parts, state, tx


NO_INITIALISATION = "none"  # train.init_from value that trains from random weights on purpose
IMAGENET_WEIGHTS_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet101-imagenet.pth"


def check_initialisation(config: ExperimentConfig) -> None:
    """Refuses to train the authors' ResNet-101 CCNet from random weights unless asked to.

    The authors always start from MIT CSAIL's ImageNet ResNet-101 (deep stem);
    from random weights the recipe gives far lower mIoU, and nothing else warns.
    """
    model = config.model
    if config.train.init_from is None and (model.depth, model.width, model.blocks) == (101, 64, None):
        raise ConfigError(
            "this recipe trains a ResNet-101 CCNet, which the authors always start from MIT CSAIL's ImageNet "
            f"ResNet-101: download {IMAGENET_WEIGHTS_URL}, convert it with `ccnet convert "
            "resnet101-imagenet.pth weights/resnet101 --format imagenet-deep`, and pass "
            "--set train.init_from=weights/resnet101 (or --init-from); --set train.init_from=none trains from "
            "random weights on purpose"
        )


def check_micro_batches(t: TrainSettings, devices: int) -> None:
    """train.batch_size must split into train.accumulate_steps micro-batches that each divide over the
    devices; checked before the model is built."""
    count, batch = t.accumulate_steps, t.batch_size
    if not isinstance(count, int):
        raise ConfigError(f"train.accumulate_steps must be a whole number of micro-batches, got {count!r}")
    if count == 1 or batch % (count * devices) == 0:
        return
    share = batch // devices  # each device's images per step, a whole number: checked before
    # More micro-batches than asked keep a device's micro-batch as small (memory); fewer are the others.
    counts = [n for n in range(count + 1, share + 1) if share % n == 0][:1]
    counts += [max(n for n in range(1, count) if share % n == 0)]
    fixes = " or ".join(f"--set train.accumulate_steps={n}" for n in counts)
    on = "one device" if devices == 1 else f"the {devices} devices"
    images = f"{share} image{'s' if share > 1 else ''} a device"
    raise ConfigError(f"train.batch_size {batch} does not split into train.accumulate_steps {count} micro-batches "
                      f"that divide over {on} ({images}); pass {fixes}, or --set "
                      f"train.batch_size={-(-batch // (count * devices)) * count * devices}")


def check_ohem_groups(t: TrainSettings, devices: int) -> None:
    """With train.ohem, its groups must divide the batch (each micro-batch of it, with
    train.accumulate_steps); checked before the model is built, as the loss would raise only when
    the first step is traced."""
    group, count = t.ohem_images_per_group, t.accumulate_steps
    batch = t.batch_size // count
    if not t.ohem or batch % group == 0:
        return
    fits = max(n for n in range(1, group + 1) if batch % n == 0)
    step = math.lcm(group, devices) * count  # a batch must also divide over the devices
    what = f"train.batch_size {t.batch_size}" if count == 1 else (
        f"the micro-batch of {batch} images (train.batch_size {t.batch_size} / train.accumulate_steps {count})")
    raise ConfigError(f"train.ohem_images_per_group {group} does not divide {what}: OHEM selects "
                      f"pixels per group of that many images; pass --set train.ohem_images_per_group={fits} (a "
                      f"divisor of {batch}; the authors' groups hold 2), or --set "
                      f"train.batch_size={-(-t.batch_size // step) * step} to keep groups of {group}")


def enable_compilation_cache(directory: Path) -> None:
    """Compiled programs persist in `directory` (unless a cache is already set, e.g. by
    JAX_COMPILATION_CACHE_DIR), so a run restarted after preemption does not compile again.

    The setting is process-wide: the command line sets it per run, in its own process.
    """
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))


def run_evaluation(config: ExperimentConfig, mesh, parts: ModelParts, state: TrainState, predict=None,
                   stop=None, on_batch=None) -> np.ndarray:
    """The confusion matrix of the current parameters on `data.eval_split` (EvaluationStopped when
    `stop()` turns true; `on_batch` as for `evaluate`)."""
    predict = predict or make_predict_fn(parts, config.eval, config.model.num_classes, mesh)
    with inputs.eval_iterator(config, mesh) as batches:
        return evaluate(predict, state.params, state.batch_stats, batches, config.model.num_classes,
                        total=len(batches), stop=stop, on_batch=on_batch)


class _ValidationReport:
    """After each evaluation in training: mIoU, per-class IoU and the first image's pictures to
    TensorBoard (its attention only in a one-process run, where one host can compute it alone)."""

    def __init__(self, config: ExperimentConfig, parts: ModelParts, progress: Progress, devices: int):
        self.progress = progress
        self.devices = devices
        self.class_names = dataset_spec(config.data.name).class_names
        self.colours = palette_for(config.data.name, config.model.num_classes)
        self.normalization = inputs.NORMALIZATIONS[config.data.normalization]
        self.maps = None
        if config.model.attention == "cca" and jax.process_count() == 1:
            self.maps = attention.jitted_recurrence_maps(functools.partial(parts.model, train=False))
        self.prefer = _PREFERRED_PIXELS.get(config.data.name, ())
        self.first: EvaluatedImage | None = None

    def on_batch(self, batch, predictions) -> None:
        if self.first is None and len(predictions):
            self.first = evaluated_image(batch, predictions, 0, self.normalization, local_rows)

    def report(self, step: int, confusion: np.ndarray, state: TrainState) -> float:
        miou = mean_iou(confusion)
        ious = class_iou(confusion)
        scalars = {"miou": miou, **{f"iou/{name}": float(v) for name, v in zip(self.class_names, ious) if v == v}}
        self.progress.scalars(step, scalars, prefix="val/")
        if self.first is not None:
            pictures = {"val/prediction": prediction_picture(self.first, self.colours)}
            if self.maps is not None:
                pictures["val/attention"] = attention_picture(self.maps, state.params, state.batch_stats,
                                                              self.first, None, self.prefer, self.devices)
            self.progress.images(step, pictures)
        self.first = None
        return miou


def _check_resumable(workdir: Path, config: ExperimentConfig, checkpoints: Checkpoints) -> None:
    """Refuses to resume checkpoints written under a config they cannot serve (e.g. another model).
    Settings that may change (steps, data, evaluation) are named, and the config.json they replace
    is kept as config_until_step_STEP.json: it says what the checkpoints so far were trained on."""
    saved = workdir / "config.json"
    if not checkpoints.steps() or not saved.is_file():
        return
    previous = json.loads(saved.read_text())
    conflicts = resume_conflicts(previous, config)
    if conflicts:
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with another config ({'; '.join(conflicts)}). "
            f"Resume it with its own config ({saved}), or train in a new workdir (--workdir DIR) "
            f"or after deleting {workdir}."
        )
    changes = config_changes(previous, config)
    if changes and jax.process_index() == 0:
        kept = workdir / f"config_until_step_{checkpoints.steps()[-1]}.json"
        shutil.copyfile(saved, kept)
        print(f"note: resuming with changed settings ({'; '.join(changes)}); the previous config is kept as "
              f"{kept}", file=sys.stderr, flush=True)


def _check_finite(step: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
    """The step's metrics as floats; FloatingPointError if the loss or the gradient norm is not finite."""
    scalars = {k: float(v) for k, v in metrics.items()}
    if not (np.isfinite(scalars["loss"]) and np.isfinite(scalars["grad_norm"])):
        raise FloatingPointError(
            f"the loss is {scalars['loss']} (gradient norm {scalars['grad_norm']}) at step {step}; lower "
            "train.learning_rate or use train.compute_dtype=float32 and run again (it resumes from the latest "
            "checkpoint: only finite states are saved)"
        )
    return scalars


def train(config: ExperimentConfig, *, evaluate_at_end: bool = True) -> RunResult:
    """Trains to `train.steps`, resuming from WORKDIR/checkpoints if it holds a checkpoint."""
    inputs.check_classes(config)
    check_initialisation(config)
    t = config.train
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    if t.batch_size % mesh.devices.size:
        devices = mesh.devices.size
        raise ValueError(f"train.batch_size {t.batch_size} must be a multiple of the {devices} devices; pass "
                         f"--set train.batch_size={-(-t.batch_size // devices) * devices} (or another multiple "
                         f"of {devices}), or run on fewer devices")
    check_micro_batches(t, mesh.devices.size)
    check_ohem_groups(t, mesh.devices.size)
    if evaluate_at_end or t.eval_every:  # a bad evaluation setting fails now, not after the training
        inputs.eval_source(config, mesh)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=t.keep, async_save=t.async_checkpoints)
    # Closed however the run ends, also when a resume is refused: an open TensorBoard writer
    # prints a traceback at interpreter exit, after the error message.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(checkpoints.close)
        _check_resumable(workdir, config, checkpoints)
        if jax.process_index() == 0:
            save_config(config, workdir / "config.json")
        # A checkpoint replaces every array, so a resume does not need the initial weights (they may be gone).
        parts, state, tx = build_state(config, mesh, init_from=None if checkpoints.steps() else t.init_from)
        batches = inputs.train_iterator(config, mesh)
        cleanup.callback(batches.close)
        found = checkpoints.restore_latest(state)
        progress = Progress(t.steps, t.batch_size, 0, workdir / "tensorboard")
        cleanup.callback(progress.close)
        if found is not None:
            step, state, data_state, _ = found
            batches.set_state(local_position(data_state, t.batch_size, str(checkpoints.directory / str(step))))
            progress.note(f"resumed from {checkpoints.directory / str(step)}")
        train_step = make_train_step(parts, tx, config.train, mesh, accumulate_steps=t.accumulate_steps)
        predict = make_predict_fn(parts, config.eval, config.model.num_classes, mesh)
        schedule = poly_schedule(config.train, t.steps)
        meta = {"config": config.to_dict()}
        step = int(state.step)
        progress.mark_step = step
        result = RunResult(step, None, None, False)
        validation = _ValidationReport(config, parts, progress, mesh.devices.size)
        metrics = None  # of the last step taken by this process

        def save(miou: float | None = None) -> None:
            # A diverged state is never saved: resuming it would diverge again whatever the new settings.
            if metrics is not None:
                _check_finite(step, metrics)
            checkpoints.save(step, state, gather_position(batches.get_state(), t.batch_size), meta, miou=miou)

        def evaluation() -> np.ndarray:
            try:
                return run_evaluation(config, mesh, parts, state, predict, preemption.now, validation.on_batch)
            except EvaluationStopped:
                raise
            except Exception:
                save()  # the steps trained since the last checkpoint outlive a failed evaluation
                raise

        with Preemption() as preemption:
            stopped = False
            first_step = step + 1
            while step < t.steps and not stopped:
                batch = next(batches)
                state, metrics = train_step(state, batch)
                step += 1
                if step == first_step:  # throughput counts from here, without the compilation
                    jax.block_until_ready(metrics)
                    progress.restart_clock(step)
                if step % t.log_every == 0 or step == t.steps:
                    scalars = _check_finite(step, metrics)
                    progress.log(step, {"loss": scalars["loss"], "main": scalars["main"], "aux": scalars["aux"],
                                        "grad_norm": scalars["grad_norm"], "lr": float(schedule(step - 1))})
                miou = None
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    try:
                        confusion = evaluation()
                    except EvaluationStopped:
                        stopped = True
                    else:
                        miou = validation.report(step, confusion, state)
                        progress.note(f"step {step}: validation mIoU {miou:.4f}")
                if miou is not None or (step % t.checkpoint_every == 0 and step < t.steps):
                    save(miou)
                    progress.restart_clock(step)
                stopped = stopped or preemption.at_step(step)
            if not stopped and evaluate_at_end:
                try:
                    result.confusion = evaluation()
                except EvaluationStopped:
                    stopped = True
                else:
                    result.miou = validation.report(step, result.confusion, state)
            result.step = step
            result.interrupted, result.stopped_by = stopped, preemption.reason
            if stopped:
                progress.note(f"{preemption.reason}: saving a checkpoint at step {step} and stopping")
            save(result.miou)
    return result
