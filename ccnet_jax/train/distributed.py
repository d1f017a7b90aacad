"""Multi-host start-up: `jax.distributed.initialize` before anything touches a device.

Three ways to join a multi-process run:
- by hand: `--coordinator HOST:PORT --num-processes N --process-id I` on every process;
- under SLURM (`srun`) or Open MPI (`mpirun`) with more than one task: joined
  automatically, jax.distributed reading the job's size, rank and first node from
  the launcher's environment (`--distributed off` runs each process alone);
- `--distributed auto`: jax.distributed's detection of any cluster it knows
  (also Kubernetes JobSets, with the `kubernetes` package), failing if none is found.
"""

from __future__ import annotations

import os
from typing import Literal

import jax

DistributedMode = Literal["env", "auto", "off"]

# What each launcher sets for every task (SLURM: only inside an `srun` step).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OPEN_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


def launcher_tasks(environ: dict[str, str] | None = None) -> tuple[str, int] | None:
    """(launcher, task count) when this process is one task of a SLURM or Open MPI job of several
    tasks, else None. ValueError when the launcher's variables are there only in part."""
    environ = os.environ if environ is None else environ
    # Open MPI first, as jax.distributed's detection: mpirun inside a SLURM allocation sets both.
    for name, variables, count_var in (("Open MPI", _OPEN_MPI_VARS, "OMPI_COMM_WORLD_SIZE"),
                                       ("SLURM", _SLURM_VARS, "SLURM_NTASKS")):
        if count_var not in environ:
            continue
        try:
            tasks = int(environ[count_var])
        except ValueError:
            raise ValueError(f"{count_var}={environ[count_var]!r} is not a task count") from None
        if tasks <= 1:
            continue
        missing = [v for v in variables if v not in environ]
        if missing:
            how = "inside an srun step" if name == "SLURM" else "under mpirun"
            raise ValueError(f"{count_var} is {tasks} but {', '.join(missing)} is not set: run every task {how}, "
                             "pass --coordinator/--num-processes/--process-id, or --distributed off")
        return name, tasks
    return None


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               mode: DistributedMode = "env") -> None:
    """Joins a multi-process JAX run as the module docstring says, or does nothing for one process.

    Every process runs the same command; afterwards `jax.devices()` lists all
    processes' devices and the same training code runs unchanged (each process
    feeds its share of every global batch).
    """
    by_hand = (coordinator, num_processes, process_id) != (None, None, None)
    if by_hand:
        if mode != "env":
            raise ValueError(f"--distributed {mode} and --coordinator/--num-processes/--process-id exclude each "
                             "other: pass one or the other")
        if coordinator is None:
            raise ValueError("--num-processes/--process-id need --coordinator HOST:PORT")
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id as well")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return
    if mode == "off":
        return
    if mode == "env":
        found = launcher_tasks()
        if found is None:
            return
        where = f"this {found[0]} job of {found[1]} tasks"
    else:
        where = "a cluster (--distributed auto)"
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"could not join {where}: {str(err).splitlines()[0]}; pass --coordinator/"
                         "--num-processes/--process-id by hand, or --distributed off to run alone") from err
