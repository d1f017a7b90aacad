"""Every process's input-iterator position, saved together in a checkpoint.

Each process reads its own share of the data, so each has its own iterator
state. A checkpoint keeps all of them, with the process count and global
batch size they belong to: a run resumed with another process count or batch
size would read other shares, so it is refused instead of silently seeing
examples twice or never.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from ccnet_jax.config import ConfigError


def _allgather_json(value: Any) -> list[Any]:
    """`value` of every process, in process order (a collective; one process: no communication)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array(len(data), np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(everyone, lengths)]


def gather_position(local_state: dict[str, Any], global_batch_size: int) -> dict[str, Any]:
    """The saved form: {"process_count", "global_batch_size", "processes": [state of process i]}.
    Every process must call it at the same point (it is a collective)."""
    return {"process_count": jax.process_count(), "global_batch_size": global_batch_size,
            "processes": _allgather_json(local_state)}


def local_position(saved: dict[str, Any], global_batch_size: int, where: str) -> dict[str, Any]:
    """This process's iterator state from `gather_position`'s form; ConfigError if the run's process
    count or batch size differs from the saved one. A checkpoint written before positions were
    gathered holds one process's state, which serves a one-process run."""
    if "processes" not in saved:
        if jax.process_count() != 1:
            raise ConfigError(f"{where} holds one process's data position (an older checkpoint); resume it "
                              "with one process")
        return saved
    count, batch = saved["process_count"], saved["global_batch_size"]
    if (count, batch) != (jax.process_count(), global_batch_size):
        raise ConfigError(
            f"{where} was saved by {count} process(es) with train.batch_size {batch}; this run has "
            f"{jax.process_count()} with {global_batch_size}. Each process reads its own share of the data, "
            "so resume with the same process count and batch size, or train in a new workdir"
        )
    return saved["processes"][jax.process_index()]
