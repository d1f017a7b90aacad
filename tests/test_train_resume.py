"""Kill (SIGKILL) mid-training and resume == an uninterrupted run, bitwise; damaged checkpoints."""

import shutil
import signal

import jax
import numpy as np
import pytest

from ccnet_jax import config as config_lib
from ccnet_jax.data import prepare
from ccnet_jax.train.checkpoint import Checkpoints
from ccnet_jax.train.loop import build_state
from ccnet_jax.train.step import make_mesh
from tests.train_helpers import ccnet, ccnet_popen, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    prepare("long_range", path, None, "tiny")
    return path


def _final_state(config_path, workdir):
    config = config_lib.load(config_path)
    state = build_state(config, make_mesh())[1]
    checkpoints = Checkpoints(workdir / "checkpoints")
    try:
        step, state, data_state, _ = checkpoints.restore_latest(state)
    finally:
        checkpoints.close()
    return step, state, data_state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("straight")
    config = tiny_config(root / "c.json", data_dir, root / "run")
    ccnet("train", "--config", str(config), "--no-eval")
    return config, root / "run"


def test_sigkill_and_resume_gives_bitwise_identical_parameters(tmp_path, data_dir, uninterrupted):
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run")
    process = ccnet_popen("train", "--config", str(config), "--no-eval")
    for line in process.stdout:
        if line.startswith("step 5/6"):  # the checkpoint of step 4 is complete or being written
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert Checkpoints(tmp_path / "run" / "checkpoints").steps()[-1] < 6
    resumed = ccnet("train", "--config", str(config), "--no-eval")
    assert "resumed from" in resumed.stderr

    step_a, state_a, data_a = _final_state(*uninterrupted)
    step_b, state_b, data_b = _final_state(config, tmp_path / "run")
    assert step_a == step_b == 6
    assert data_a == data_b
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, uninterrupted, capfd):
    config_path, workdir = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    checkpoints = Checkpoints(copy / "checkpoints")
    steps = checkpoints.steps()
    assert steps == [4, 6]
    # Damage the latest: its array data disappears (e.g. a disk fault after the save).
    for path in (copy / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    state = build_state(config_lib.load(config_path), make_mesh())[1]
    try:
        step, restored, _, _ = checkpoints.restore_latest(state)
    finally:
        checkpoints.close()
    assert step == 4
    assert int(restored.step) == 4
    err = capfd.readouterr().err
    assert "checkpoints/6" in err and "damaged" in err
