"""orbax checkpoints of a training run: state, data-iterator position and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}; `state` is the
`TrainState` (StandardSave), `data` the input iterator's `get_state()` and
`meta` a JSON dict (config, validation mIoU). orbax writes every checkpoint
into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoints untouched and the half-written one
is never taken for complete.

Kept: the `keep` most recent checkpoints, plus the one with the best
validation mIoU (checkpoints saved with `metrics={"miou": ...}`).

A training run that finds its latest checkpoints damaged resumes from the newest
intact one and moves the damaged ones to WORKDIR/damaged_checkpoints/<step>:
left in place, they counted among the `keep` latest, so that the retention
deleted intact checkpoints and kept them.

Readers (`ccnet eval`, `ccnet predict`) open the folder read-only: a
read-write manager deletes temporary folders when it opens, and the
temporary folder may be a save in flight from a training run.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ccnet_jax.train.checkpoint_errors import CheckpointError, WrongModelError
from ccnet_jax.train.state import TrainState
from ccnet_jax.tree_shapes import model_mismatch

__all__ = ["CheckpointError", "Checkpoints", "WrongModelError", "abstract_like", "model_mismatch", "restore_params"]

def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of `tree`'s arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restored_everywhere(restored_here: bool) -> bool:
    """Whether every process restored a step (a collective with several processes)."""
    if jax.process_count() == 1:
        return restored_here
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array(restored_here, np.int32))).all())


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns 'Given directory is read only' whenever a manager opens read-only, which is how
    every reader here opens a run; a user sees it as a fault at the end of `ccnet demo`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice():
    quiet = _DropReadOnlyNotice()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Checkpoints:
    """Save and resume a run's checkpoints in `directory` (created if needed).

    With `read_only`, nothing in the folder is created, cleaned or deleted,
    and `save` is refused.
    """

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"train.keep must be >= 1 (the latest checkpoint is what resumes), got {keep}")
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        if read_only:
            if not self.directory.is_dir():
                raise FileNotFoundError(f"checkpoint folder {self.directory} does not exist")
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0
            )
            with _quiet_read_only_notice():
                self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
            return
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["miou"], n=1, keep_checkpoints_without_metrics=False
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict[str, Any],
        meta: dict[str, Any],
        *,
        miou: float | None = None,
    ) -> bool:
        """Starts saving (asynchronously if enabled); returns False if `step` is already saved."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if miou is None else {"miou": float(miou)}
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore_latest(self, target: TrainState, *, step: int | None = None
                       ) -> tuple[int, TrainState, dict[str, Any], dict[str, Any]] | None:
        """The newest checkpoint that restores: (step, state, data_state, meta), or None if none exists.
        With `step`, that checkpoint alone (CheckpointError if it is not there or does not restore).

        A checkpoint that fails to restore (damaged files) is reported on stderr
        and the one before it is tried; unless read-only, the damaged ones are
        then moved aside (`set_aside`). If all fail, CheckpointError. An intact
        checkpoint of another model raises WrongModelError, and nothing is
        taken for damaged.
        """
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.directory} has no checkpoint of step {step}; it has "
                                      f"{', '.join(map(str, steps)) or 'none'}")
            steps = [step]
        if not steps:
            return None
        abstract = abstract_like(target)
        failures, damaged = [], []
        for step in reversed(steps):
            try:
                saved = self.manager.item_metadata(step)["state"]
            except Exception:  # unreadable metadata: the restore below reports the damage
                saved = None
            mismatch = None if saved is None else model_mismatch(saved, target)
            if mismatch is not None:
                raise WrongModelError(
                    f"checkpoint {self.directory / str(step)} holds another model or optimizer than this config "
                    f"builds ({mismatch}); pass the config it was trained with (the run's config.json), "
                    "or another --checkpoint"
                )
            message = None
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # orbax raises many kinds for damaged files
                # Its first line may carry a whole tensorstore spec, thousands of characters.
                first = str(err).splitlines()[0] if str(err) else ""
                message = f"{type(err).__name__}: {first[:300]}{' ...' if len(first) > 300 else ''}"
            if not _restored_everywhere(message is None):
                # Every process skips the step, and later re-saves it, even where it read: their saves
                # and restores are collectives, so they must all take the same steps.
                message = message or "another process could not read it"
                failures.append(f"step {step}: {message}")
                damaged.append(step)
                print(f"warning: checkpoint {self.directory / str(step)} is damaged ({message}); "
                      "trying the previous one", file=sys.stderr, flush=True)
                continue
            if damaged and not self.read_only:
                self.set_aside(damaged)
            return step, restored["state"], restored["data"], restored["meta"]
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored ({'; '.join(failures)}); "
            "delete the folder to start afresh"
        )

    def set_aside(self, steps: list[int]) -> None:
        """Moves these steps' folders to damaged_checkpoints/ beside the folder (STEP, or STEP_2, ...
        where taken), out of the retention's count; nothing is deleted. A collective with several
        processes: the first moves them, every one then reads the folder again."""
        aside = self.directory.parent / "damaged_checkpoints"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target, count = aside / str(step), 1
                while target.exists():
                    count += 1
                    target = aside / f"{step}_{count}"
                shutil.move(self.directory / str(step), target)
                print(f"note: moved the damaged checkpoint {self.directory / str(step)} to {target}; "
                      "delete it once you no longer need it", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ccnet_damaged_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str | Path, target: TrainState, step: int | None = None
                   ) -> tuple[Any, Any, dict[str, Any], int]:
    """(params, batch_stats, meta, step) of the newest restorable checkpoint of a training run's
    folder, or of `step`'s; opened read-only (a training run may be writing to it)."""
    checkpoints = Checkpoints(directory, read_only=True)
    try:
        found = checkpoints.restore_latest(target, step=step)
    finally:
        checkpoints.close()
    if found is None:
        raise CheckpointError(f"{directory} holds no checkpoint; train first, or pass the run's workdir")
    step, state, _, meta = found
    return state.params, state.batch_stats, meta, step
