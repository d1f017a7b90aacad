"""Busy time per operation of one traced call (jax.profiler), for the benchmarks' profiles."""

from __future__ import annotations

import collections
import gzip
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import jax

# Host-side events (Python, PJRT, XLA's thunk executor) wrap the device work and would count it
# again; left out.
HOST_EVENT_PREFIXES = ("$", "Thunk", "Slinky", "Pjit", "PjRt", "PJRT", "Common", "[", "Gpu", "jit_", "Execute")
# A GPU's timeline in the trace holds its streams' kernels and memcopies, and also lines the
# profiler derives from them (the HLO ops and modules those kernels belong to, steps, launch
# statistics): those span the same device time under other names, so only the streams count.
DERIVED_DEVICE_LINES = ("Steps", "XLA Modules", "XLA Ops", "Async XLA Ops", "Launch Stats", "Source code",
                        "TensorFlow Ops", "TensorFlow Name Scope", "SparseCore")


def busy_times(run: Callable[[], object], keep_trace: Path | None = None) -> collections.Counter:
    """ms of busy time per operation name (numbered copies merged) in one traced call of `run`:
    the GPU's own kernels and copies on a GPU, XLA operations on the CPU (thread time, so the sum
    can exceed the wall time). `keep_trace`: where to copy the trace (.trace.json.gz) as well."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            jax.block_until_ready(run())
        path = next(Path(directory).rglob("*.trace.json.gz"))
        if keep_trace is not None:
            shutil.copyfile(path, keep_trace)
        trace = json.load(gzip.open(path))
    return busy_in_trace(trace["traceEvents"] if isinstance(trace, dict) else trace)


def busy_in_trace(events: Iterable[dict]) -> collections.Counter:
    """`busy_times` of a Chrome-format trace's events: where the trace has a GPU's timeline
    ('/device:GPU:N'), the events on its stream lines, each (name, start, duration) once; else
    every complete event that is not a host-side wrapper."""
    events = list(events)
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpus = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
    busy = collections.Counter()
    seen = set()
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        name = event.get("name", "")
        if gpus:
            line = threads.get((event["pid"], event.get("tid")), "")
            if event["pid"] not in gpus or line.startswith(DERIVED_DEVICE_LINES):
                continue
            key = (name, event.get("ts"), event["dur"])
            if key in seen:
                continue
            seen.add(key)
        elif name.startswith(HOST_EVENT_PREFIXES):
            continue
        busy[re.sub(r"\.\d+$", "", name)] += event["dur"] / 1e3
    return busy


def busiest_lines(busy: collections.Counter, count: int) -> list[str]:
    """The `count` busiest operations of `busy_times`, one line each: name (cut to 60
    characters), ms busy, and share of the whole trace's busy time."""
    total = sum(busy.values())
    return [f"  {name[:60]:60} {ms:9.3f} ms {100 * ms / total:5.1f}%" for name, ms in busy.most_common(count)]
