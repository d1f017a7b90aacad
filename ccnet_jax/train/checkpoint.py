"""orbax checkpoints of a training run: state, data-iterator position and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}; `state` is the
`TrainState` (StandardSave), `data` the input iterator's `get_state()` and
`meta` a JSON dict (config, validation mIoU). orbax writes every checkpoint
into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoints untouched and the half-written one
is never taken for complete.

Kept: the `keep` most recent checkpoints, plus the one with the best
validation mIoU (checkpoints saved with `metrics={"miou": ...}`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ccnet_jax.train.state import TrainState

_ITEMS = ("state", "data", "meta")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of `tree`'s arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointError(RuntimeError):
    """No checkpoint in a folder could be restored."""


class Checkpoints:
    """Save and resume a run's checkpoints in `directory` (created if needed)."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"train.keep must be >= 1 (the latest checkpoint is what resumes), got {keep}")
        self.directory = Path(directory).absolute()
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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

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
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if miou is None else {"miou": float(miou)}
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore_latest(self, target: TrainState) -> tuple[int, TrainState, dict[str, Any], dict[str, Any]] | None:
        """The newest checkpoint that restores: (step, state, data_state, meta), or None if none exists.

        A checkpoint that fails to restore (damaged files) is reported on stderr
        and the one before it is tried; if all fail, CheckpointError.
        """
        steps = self.steps()
        if not steps:
            return None
        abstract = abstract_like(target)
        failures = []
        for step in reversed(steps):
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
                message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                failures.append(f"step {step}: {message}")
                print(f"warning: checkpoint {self.directory / str(step)} is damaged ({message}); "
                      "trying the previous one", file=sys.stderr, flush=True)
                continue
            return step, restored["state"], restored["data"], restored["meta"]
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored ({'; '.join(failures)}); "
            "delete the folder to start afresh"
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str | Path, target: TrainState) -> tuple[Any, Any, dict[str, Any]]:
    """(params, batch_stats, meta) of the newest restorable checkpoint of a training run's folder."""
    checkpoints = Checkpoints(directory)
    try:
        found = checkpoints.restore_latest(target)
    finally:
        checkpoints.close()
    if found is None:
        raise CheckpointError(f"{directory} holds no checkpoint; train first or point to WORKDIR/checkpoints")
    _, state, _, meta = found
    return state.params, state.batch_stats, meta
