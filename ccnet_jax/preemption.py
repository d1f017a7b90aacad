"""SIGTERM as a stop request that every process of a run agrees on.

One process: a Python SIGTERM handler sets a flag, read at the next check.

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
"""

from __future__ import annotations

import signal

import numpy as np

# Where jax.distributed's preemption service records a received SIGTERM (xla's preemption_sync_manager.cc).
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


class EvaluationStopped(Exception):
    """An evaluation's stop check asked it to stop (SIGTERM) before the end of the split."""


class Preemption:
    """Context manager over a training run or an evaluation; checks are sticky once true."""

    def __init__(self):
        import jax

        self.multi_process = jax.process_count() > 1
        self._requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if not self.multi_process:
            # A Python handler would replace jax.distributed's own, so it is set only without one.
            def handler(signum, frame):
                self._requested = True

            self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

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


def _notice_received() -> bool:
    from jax._src import distributed  # the client of jax.distributed; no public accessor exists

    client = distributed.global_state.client
    if client is None:
        return False
    try:
        return client.key_value_try_get(_NOTICE_KEY) is not None
    except Exception:  # raised when the key is absent
        return False
