"""Multi-host start-up: `jax.distributed.initialize` before anything touches a device."""

from __future__ import annotations

import jax


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-process JAX run when a coordinator is given (host:port), else does nothing.

    Every process runs the same command with its own `process_id`; afterwards
    `jax.devices()` lists all processes' devices and the same training code
    runs unchanged (each process feeds its share of every global batch).
    """
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes/--process-id need --coordinator HOST:PORT")
        return
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id as well")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
