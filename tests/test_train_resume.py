"""Kill (SIGKILL) mid-training and resume == an uninterrupted run, bitwise; damaged checkpoints."""

import re
import shutil
import signal
import socket
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccnet_jax import config as config_lib
from ccnet_jax.train.checkpoint import Checkpoints, WrongModelError
from ccnet_jax.train.data_position import local_position
from ccnet_jax.train.loop import build_state
from ccnet_jax.train.step import make_mesh
from tests.train_helpers import ccnet, ccnet_popen, tiny_config


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


def _assert_same_as_uninterrupted(uninterrupted, config, workdir):
    """The run in `workdir` ended at step 6 with the uninterrupted run's state and data position, bitwise."""
    step_a, state_a, data_a = _final_state(*uninterrupted)
    step_b, state_b, data_b = _final_state(config, workdir)
    assert step_a == step_b == 6
    assert data_a == data_b
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
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

    _assert_same_as_uninterrupted(uninterrupted, config, tmp_path / "run")


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
    assert "checkpoints/6" in err and "damaged" in err and len(max(err.splitlines(), key=len)) < 600
    # Moved aside, not deleted: left in place it counted among the `keep` latest, and the
    # retention deleted the intact step 4 while keeping it.
    assert f"moved the damaged checkpoint {copy / 'checkpoints' / '6'} to {copy / 'damaged_checkpoints' / '6'}" in err
    assert (copy / "damaged_checkpoints" / "6" / "state").is_dir() and not (copy / "checkpoints" / "6").exists()

    # The rerun resumes from 4 without a word, and its saves of 6 and 8 keep 6 and 8.
    checkpoints = Checkpoints(copy / "checkpoints")
    try:
        assert checkpoints.steps() == [4] and checkpoints.restore_latest(state)[0] == 4
        assert "damaged" not in capfd.readouterr().err
        assert checkpoints.save(6, restored.replace(step=restored.step + 2), {}, {"config": {}})
        checkpoints.manager.wait_until_finished()
        assert checkpoints.save(8, restored.replace(step=restored.step + 4), {}, {"config": {}})
        checkpoints.manager.wait_until_finished()
        assert checkpoints.steps() == [6, 8]
    finally:
        checkpoints.close()
    checkpoints = Checkpoints(copy / "checkpoints", read_only=True)
    try:
        step, replaced, _, _ = checkpoints.restore_latest(state)
    finally:
        checkpoints.close()
    assert step == 8 and int(replaced.step) == 8
    assert "damaged" not in capfd.readouterr().err


def test_another_models_checkpoint_is_reported_as_such_not_as_damage(tmp_path, uninterrupted, capfd):
    config_path, workdir = uninterrupted
    wider = build_state(config_lib.load(config_path, ["model.width=16"]), make_mesh())[1]
    checkpoints = Checkpoints(workdir / "checkpoints", read_only=True)
    try:
        with pytest.raises(WrongModelError, match=r"holds another model .*\(64,\) where this model has \(128,\)"):
            checkpoints.restore_latest(wider)
    finally:
        checkpoints.close()
    assert "damaged" not in capfd.readouterr().err
    result = ccnet("eval", "--checkpoint", str(workdir), "--config", str(config_path), "--set", "model.width=16",
                   check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "holds another model" in error[0] and "delete" not in error[0]


def test_readers_leave_a_save_in_flight_alone(tmp_path, uninterrupted):
    from ccnet_jax.train.checkpoint import restore_params

    config_path, workdir = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    in_flight = copy / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000"  # a training run's save being written
    (in_flight / "state").mkdir(parents=True)
    state = build_state(config_lib.load(config_path), make_mesh())[1]
    params, _, _, _ = restore_params(copy / "checkpoints", state)
    assert jax.tree.leaves(params) and in_flight.is_dir()
    # A read-write manager, as the training run itself opens the folder, does clean it up (in the background).
    writer = Checkpoints(copy / "checkpoints")
    try:
        for _ in range(100):
            if not in_flight.exists():
                break
            time.sleep(0.1)
    finally:
        writer.close()
    assert not in_flight.exists()


def test_resuming_under_another_model_is_refused(tmp_path, uninterrupted):
    from ccnet_jax.train.loop import train

    config_path, workdir = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    saved = (copy / "config.json").read_text()
    config = config_lib.load(config_path, [f"workdir={copy}", "model.width=16", "train.optimizer=adamw",
                                           "train.batch_size=8"])
    with pytest.raises(config_lib.ConfigError) as error:
        train(config)
    assert "model.width: 8 -> 16" in str(error.value)
    assert "train.optimizer: 'sgd' -> 'adamw'" in str(error.value)
    assert "train.batch_size: 4 -> 8" in str(error.value)
    assert (copy / "config.json").read_text() == saved  # nothing was written
    # More steps, another learning rate or another implementation of the op may resume.
    longer = config_lib.load(config_path, ["train.steps=12", "train.learning_rate=0.1", "model.implementation=pallas"])
    import json

    assert config_lib.resume_conflicts(json.loads(saved), longer) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum, name, code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_sigterm_saves_and_resumes_to_the_same_parameters(tmp_path, data_dir, uninterrupted, signum, name, code):
    # Ctrl-C (SIGINT) as SIGTERM: it raised KeyboardInterrupt, and the steps since the last checkpoint were lost.
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", checkpoint_every=100)
    process = ccnet_popen("train", "--config", str(config), "--no-eval")
    for line in process.stdout:
        if line.startswith("step 3/6"):
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-2000:]
    assert f"{name}: saving a checkpoint" in stderr and "Traceback" not in stderr
    saved = Checkpoints(tmp_path / "run" / "checkpoints").steps()
    assert len(saved) == 1 and 3 <= saved[0] < 6  # only the SIGTERM save: checkpoint_every is 100
    resumed = ccnet("train", "--config", str(config), "--no-eval")
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / str(saved[0])}" in resumed.stderr

    _assert_same_as_uninterrupted(uninterrupted, config, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_to_one_of_two_hosts_stops_both_at_one_step(tmp_path, data_dir):
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", steps=60, checkpoint_every=1000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"

    def hosts():
        return [ccnet_popen("train", "--config", str(config), "--no-eval", "--coordinator", coordinator,
                            "--num-processes", "2", "--process-id", str(i), devices=2) for i in range(2)]

    processes = hosts()
    for line in processes[0].stdout:  # process 0 prints the progress
        if re.match(r"step +3/60", line):
            processes[1].send_signal(signal.SIGTERM)  # the other host only
            break
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 143, stderr[-3000:]
    stops = {int(re.search(r"stopped at step (\d+)", stdout).group(1)) for stdout, _ in outputs}
    assert len(stops) == 1 and 3 <= min(stops) < 60
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", read_only=True)
    saved = checkpoints.steps()
    assert saved == sorted(stops)  # the one agreed step, saved by both hosts together
    position = checkpoints.manager.restore(saved[0], args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    assert (position["process_count"], position["global_batch_size"], len(position["processes"])) == (2, 4, 2)
    with pytest.raises(config_lib.ConfigError, match="saved by 2 process"):
        local_position(position, 4, "that checkpoint")  # this test is one process

    processes = hosts()
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / str(saved[0])}" in outputs[0][1]
    assert Checkpoints(tmp_path / "run" / "checkpoints", read_only=True).steps()[-1] == 60


def test_a_runs_checkpoints_folder_or_one_steps_folder_loads_with_the_runs_config(uninterrupted, capsys):
    # WORKDIR/checkpoints, which an error suggested, found no config.json there and built the default
    # ResNet-101 ("holds another model"); one step's folder "held no checkpoint".
    from ccnet_jax.commands.restore import load_weights, locate, run_config
    from ccnet_jax.train.checkpoint import CheckpointError

    config_path, workdir = uninterrupted
    config = config_lib.load(config_path)
    assert locate(workdir) == (workdir, workdir / "checkpoints", None)
    assert locate(workdir / "checkpoints") == (workdir, workdir / "checkpoints", None)
    assert locate(workdir / "checkpoints" / "4") == (workdir, workdir / "checkpoints", 4)
    for path in (workdir / "checkpoints", workdir / "checkpoints" / "4"):
        assert run_config(path).model == config.model
    _, newest = load_weights(config, workdir / "checkpoints", make_mesh())
    assert f"weights: {workdir / 'checkpoints' / '6'} (step 6)" in capsys.readouterr().err
    _, fourth = load_weights(config, workdir / "checkpoints" / "4", make_mesh())
    assert f"weights: {workdir / 'checkpoints' / '4'} (step 4)" in capsys.readouterr().err
    checkpoints = Checkpoints(workdir / "checkpoints", read_only=True)
    try:
        want = checkpoints.restore_latest(build_state(config, make_mesh())[1], step=4)[1]
        with pytest.raises(CheckpointError, match="has no checkpoint of step 5; it has 4, 6"):
            checkpoints.restore_latest(want, step=5)
    finally:
        checkpoints.close()
    for got, expected in zip(jax.tree.leaves(fourth.params), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(got, expected)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fourth.params),
                                                        jax.tree.leaves(newest.params)))


def test_a_resume_with_other_data_names_the_changes_and_keeps_the_config_they_replace(tmp_path, uninterrupted,
                                                                                     capsys):
    # config.json was overwritten without a word: the record of what the checkpoints were trained on was lost.
    from ccnet_jax.train import loop

    config_path, workdir = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    saved = (copy / "config.json").read_text()
    checkpoints = Checkpoints(copy / "checkpoints", read_only=True)
    try:
        same = config_lib.load(config_path, [f"workdir={copy}"])
        loop._check_resumable(copy, same, checkpoints)  # moved, not changed: nothing to say
        assert "note:" not in capsys.readouterr().err and not list(copy.glob("config_until_step_*"))
        changed = config_lib.load(config_path, [f"workdir={copy}", "data.builder_config=default", "train.steps=9"])
        loop._check_resumable(copy, changed, checkpoints)
    finally:
        checkpoints.close()
    err = capsys.readouterr().err
    assert "note: resuming with changed settings (data.builder_config: 'tiny' -> 'default'; train.steps: 6 -> 9)" in err
    assert (copy / "config_until_step_6.json").read_text() == saved
