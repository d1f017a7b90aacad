"""Opening a run's checkpoints to read them (ccnet eval, predict, demo) says nothing alarming."""

import logging

from ccnet_jax.train.checkpoint import Checkpoints


def test_opening_read_only_logs_no_warning_and_leaves_absl_logging_as_it_was(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        checkpoints = Checkpoints(tmp_path, read_only=True)
        logging.getLogger("absl").warning("Given directory is read only=%s (a later message)", tmp_path)
    assert checkpoints.steps() == []
    messages = [record.getMessage() for record in caplog.records]
    # orbax's own notice is gone; the same words logged afterwards still get through.
    assert messages == [f"Given directory is read only={tmp_path} (a later message)"]
