"""Durations as people read them in progress lines (training, evaluation, prediction)."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """H:MM:SS of a number of seconds (0 for negative)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
