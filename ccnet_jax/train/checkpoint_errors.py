"""Errors of restoring a run's checkpoints; light, so the command line can catch them without orbax."""


class CheckpointError(RuntimeError):
    """No checkpoint in a folder could be restored."""


class WrongModelError(CheckpointError):
    """A checkpoint is intact but holds another model's (or optimizer's) arrays."""
