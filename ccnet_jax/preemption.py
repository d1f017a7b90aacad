"""SIGTERM as a stop request that every process of a run agrees on.

One process: a Python SIGTERM handler sets a flag, read at the next check.
Ctrl-C (SIGINT) does the same, so that an interrupted run keeps its last step;
a second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint.

Several processes (jax.distributed): SIGTERM may reach one host only, or
reach hosts at different steps. If each host stopped on its own flag, one
would enter the checkpoint save while the others entered the next step's
collectives, and the job would hang. jax.distributed's preemption service
catches SIGTERM on any host and records the notice in the coordination
service, where every host can see it:
- between training steps, `at_step(step)` asks the service's sync point,
  which is true on every host at the same step (the largest step any host
  had reached when the notice came, plus one); orbax asks it with the same
  step numbers when it saves;
- during evaluation, where the step does not advance, `now()` reads the
  notice and the hosts agree by a collective (any host noticed: all stop),
  so all of them stop after the same batch.

An error raised on some processes only (a damaged image in one host's share,
a full disk under one host's pictures) would hang the same way: the others
would wait forever in the next collective for a process that left (until
jax.distributed's shutdown barrier gives up after 5 minutes and aborts every
process with a message that does not name the error). Code where such errors
arise runs inside `StopTogether`: every process passes its end together and
raises if any process raised there.
"""

from __future__ import annotations

import itertools
import signal
import sys
from types import TracebackType
from typing import Any

import numpy as np

# Where jax.distributed's preemption service records a received SIGTERM (xla's preemption_sync_manager.cc).
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"

# StopTogether's rounds: one barrier of every process, reused; failures are recorded under a key per round.
_ROUND_BARRIER = "ccnet_stop_together"
_FAILED_KEY = "ccnet_failed/{round}/"
# As long as a healthy process may take to arrive, e.g. while it compiles a step and the others do not.
_ROUND_TIMEOUT_MS = 3_600_000
_rounds = itertools.count()


class EvaluationStopped(Exception):
    """An evaluation's stop check asked it to stop (SIGTERM) before the end of the split."""


class ProcessFailed(RuntimeError):
    """Another process of the run raised inside a `StopTogether` block; this one stops there too."""


class StopTogether:
    """A block that ends on every process at once: if it raises on some processes, every process
    raises as it ends, the failed ones their own error, the others ProcessFailed naming them and it.

    Every process must run the same blocks in the same order (as around the collectives they
    precede). With one process (no jax.distributed) it is only its block.
    """

    def __init__(self, where: str):
        self.where = where  # completes "process I failed ...", e.g. "reading its share of a batch"

    def __enter__(self) -> StopTogether:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        client = _client()
        if client is None or (error is not None and not isinstance(error, Exception)):
            return  # KeyboardInterrupt and the like stop a run whatever the others do
        import jax

        key = _FAILED_KEY.format(round=next(_rounds))
        # StopIteration, the end of a pass, comes on every process at the same block: not a failure.
        failed = error is not None and not isinstance(error, StopIteration)
        if failed:
            summary = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            client.key_value_set(f"{key}{jax.process_index()}", f"{self.where}: {summary}")
        # Set before this barrier, the keys of this round are there for every process after it.
        client.wait_at_barrier(_ROUND_BARRIER, _ROUND_TIMEOUT_MS)
        if failed:
            return  # its own error goes on, with its traceback
        others = sorted((int(name.rsplit("/", 1)[1]), what) for name, what in client.key_value_dir_get(key))
        if others:
            count = jax.process_count()
            failures = "; ".join(f"process {index} of {count} failed {what}" for index, what in others)
            raise ProcessFailed(f"{failures}. Every process stops there; the failed process's output has "
                                "the details") from None


class Preemption:
    """Context manager over a training run or an evaluation; checks are sticky once true.

    `reason` names what asked for the stop: "SIGTERM" or, with one process, "Ctrl-C".
    """

    def __init__(self):
        import jax

        self.multi_process = jax.process_count() > 1
        self._requested = False
        self._previous: dict[int, Any] = {}
        self.reason = "SIGTERM"

    def __enter__(self) -> Preemption:
        if not self.multi_process:
            # A Python handler would replace jax.distributed's own, so it is set only without one.
            def on_sigterm(signum, frame):
                self._requested = True

            def on_ctrl_c(signum, frame):
                if self._requested:
                    raise KeyboardInterrupt
                self._requested, self.reason = True, "Ctrl-C"
                print("\nCtrl-C: stopping at the next check and saving a checkpoint; press Ctrl-C again to stop "
                      "at once without one", file=sys.stderr, flush=True)

            self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
                              signal.SIGINT: signal.signal(signal.SIGINT, on_ctrl_c)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def at_step(self, step: int) -> bool:
        """Whether to stop after training step `step`; every process must call this after every step."""
        if not self._requested and self.multi_process:
            from jax.experimental import multihost_utils

            self._requested = multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def now(self) -> bool:
        """Whether to stop now, agreed by all processes (a collective: every process must call it
        at the same point, e.g. after every evaluation batch)."""
        if not self._requested and self.multi_process:
            from jax.experimental import multihost_utils

            noticed = np.array(_notice_received(), np.int32)
            self._requested = bool(np.asarray(multihost_utils.process_allgather(noticed)).any())
        return self._requested


def _client() -> Any:
    """jax.distributed's coordination service client, None without jax.distributed."""
    from jax._src import distributed  # no public accessor exists

    return distributed.global_state.client


def _notice_received() -> bool:
    client = _client()
    if client is None:
        return False
    try:
        return client.key_value_try_get(_NOTICE_KEY) is not None
    except Exception:  # raised when the key is absent
        return False
