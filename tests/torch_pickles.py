"""Pieces for writing PyTorch-style pickles without torch, shared by the checkpoint reader's tests."""

from pathlib import Path


class Global:
    """A global of the pickle (torch's or numpy's names), written by name and never imported."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle wants a reduce function to be callable; it is never called
        raise AssertionError


def payload(marker: str) -> None:
    """What a malicious checkpoint would run: here it only leaves a marker file."""
    Path(marker).write_text("ran")


class Malicious:
    """Pickled, it calls `payload` when loaded by plain pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return payload, (self.marker,)
