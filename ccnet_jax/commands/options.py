"""Command-line options shared by train, eval, predict and benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ccnet_jax import config as config_lib
from ccnet_jax.data import DataError, is_prepared, prepare
from ccnet_jax.preemption import ProcessFailed
from ccnet_jax.train.checkpoint_errors import CheckpointError


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="experiment JSON, e.g. experiments/configs/cityscapes_r101_769.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config value (JSON), e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--workdir", default=None, help="run folder (checkpoints, logs); overrides workdir")
    parser.add_argument("--data-dir", default=None, help="prepared datasets; overrides data.data_dir")


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-host (jax.distributed)",
        "Under srun or mpirun with several tasks the processes join each other by themselves; elsewhere "
        "pass the three flags below on every process.",
    )
    group.add_argument("--distributed", choices=("env", "auto", "off"), default="env",
                       help="env (default): join a SLURM or Open MPI job of several tasks; auto: any cluster "
                       "jax.distributed detects (also Kubernetes); off: run this process alone")
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def load_config(args: argparse.Namespace, base: dict | None = None) -> config_lib.ExperimentConfig:
    """The command's config: `base` (a saved or derived config) or --config, then --set, --workdir
    and --data-dir, through the one `config.load`."""
    overrides = list(args.overrides)
    if args.workdir is not None:
        overrides.append(f"workdir={args.workdir}")
    if args.data_dir is not None:  # quoted: a folder named 2024 or null is a path, not a JSON value
        overrides.append(f"data.data_dir={json.dumps(args.data_dir)}")
    return config_lib.load(base if base is not None else args.config, overrides)


def start_distributed(args: argparse.Namespace) -> None:
    from ccnet_jax.train.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)


def ensure_generated_data(config: config_lib.ExperimentConfig) -> None:
    """Prepares the embedded long_range dataset if missing (it is generated, nothing to download)."""
    data = config.data
    if data.name == "long_range" and not is_prepared(data.name, data.data_dir, data.builder_config):
        import jax

        if jax.process_index() == 0:
            print(f"preparing the embedded long_range dataset ({data.builder_config or 'default'}) "
                  f"in {data.data_dir}", file=sys.stderr, flush=True)
            prepare(data.name, data.data_dir, None, data.builder_config)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("long_range prepared")


def check_folder_path(folder: Path, option: str) -> None:
    """Refuses an output folder that is, or lies under, a file: checked before a model is loaded,
    as creating the folder would fail only after it, with a bare OS error."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == folder else f"lies under the file {path}"
                raise FileExistsError(f"{option} {folder} {where}; pass a folder")
            return


def check_output_folder(folder: Path, force: bool, option: str, forced: str) -> None:
    """Refuses a file or a path under one, and a non-empty folder unless --force (`forced` says
    what --force then does): what a command writes would replace earlier files of the same names
    without a word."""
    check_folder_path(folder, option)
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise FileExistsError(f"{option} {folder} is not empty; choose a new folder, or pass --force {forced}")


# FloatingPointError: a diverged training run, whose message says what to change. ProcessFailed: another
# process failed, and its own output has the traceback; this one's would only show where it stopped.
USER_ERRORS = (config_lib.ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError, FileExistsError,
               FloatingPointError, ProcessFailed)


def fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 1
