"""What the benchmark scripts share: count options that refuse zero or less before anything runs,
and the machine named in each table's heading."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess


def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= {minimum}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}; give a whole number >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of 0 would divide by zero or take the median of
    nothing, after the minutes of compiling)."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(0, text)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_name(device) -> str:
    """`device`'s kind, with the processor and the cores it may use where that kind is just "cpu"
    (a CPU figure means nothing without them)."""
    if device.platform == "cpu":
        return f"{cpu_name()} ({cores()} cores)"
    return device.device_kind
