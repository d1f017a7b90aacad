"""Busy time per operation of one traced call (jax.profiler), for the benchmarks' profiles."""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

# Host-side events (Python, PJRT, XLA's thunk executor) wrap the device work and would count it
# again; left out.
HOST_EVENT_PREFIXES = ("$", "Thunk", "Slinky", "Pjit", "PjRt", "PJRT", "Common", "[", "Gpu", "jit_", "Execute")


def busy_times(run: Callable[[], object]) -> collections.Counter:
    """ms of busy time per operation name (numbered copies merged) in one traced call of `run`:
    GPU kernels on a GPU, XLA operations on the CPU (thread time, so the sum can exceed the
    wall time)."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            jax.block_until_ready(run())
        trace = json.load(gzip.open(next(Path(directory).rglob("*.trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    busy = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and "dur" in event and not name.startswith(HOST_EVENT_PREFIXES):
            busy[re.sub(r"\.\d+$", "", name)] += event["dur"] / 1e3
    return busy
