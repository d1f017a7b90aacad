"""What a user of `ccnet train` and its config runs into: bad values, divergence, failed evaluations,
resumes and --init-from. The training step is replaced by a cheap stand-in where only the loop is
under test, so each test runs in seconds."""

import json

import jax.numpy as jnp
import pytest

from ccnet_jax import config as config_lib
from ccnet_jax.cli import build_parser
from ccnet_jax.train import loop
from ccnet_jax.train.checkpoint import Checkpoints
from ccnet_jax.train.progress import Progress
from ccnet_jax.train.step import make_mesh
from tests.train_helpers import tiny_config


def _config(tmp_path, data_dir, *overrides, **train):
    return config_lib.load(tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", **train), list(overrides))


@pytest.fixture
def fake_steps(monkeypatch):
    """Replaces the jitted step with one that only counts; `losses[n]` is the loss reported at step n
    (1 otherwise). Returns the list of steps taken."""
    taken, losses = [], {}

    def make_train_step(parts, tx, loss_config, mesh, accumulate_steps=1):
        def step(state, batch):
            taken.append(len(taken) + 1)
            loss = jnp.float32(losses.get(len(taken), 1.0))
            return state.replace(step=state.step + 1), {"loss": loss, "main": loss, "aux": loss,
                                                        "grad_norm": jnp.float32(1.0)}
        return step

    monkeypatch.setattr(loop, "make_train_step", make_train_step)
    return taken, losses


def _saved_steps(config):
    checkpoints = Checkpoints(f"{config.workdir}/checkpoints", read_only=True)
    try:
        return checkpoints.steps()
    finally:
        checkpoints.close()


def test_a_diverged_state_is_never_saved(tmp_path, data_dir, fake_steps):
    # The loss goes NaN at step 2, a checkpoint step but not a log step: saving it would leave a
    # checkpoint that every resume restores and diverges from again, whatever learning rate is set.
    _, losses = fake_steps
    losses.update({2: float("nan"), 3: float("nan"), 4: float("nan")})
    config = _config(tmp_path, data_dir, steps=6, log_every=4, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"the loss is nan .* at step 2; lower train.learning_rate"):
        loop.train(config, evaluate_at_end=False)
    assert _saved_steps(config) == []


def test_a_diverged_run_is_reported_without_a_traceback(tmp_path, data_dir, fake_steps, capsys, monkeypatch):
    monkeypatch.setattr(loop, "enable_compilation_cache", lambda directory: None)  # process-wide otherwise
    _, losses = fake_steps
    losses[1] = float("inf")
    config_path = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", steps=2)
    args = build_parser(["train"]).parse_args(["train", "--config", str(config_path), "--no-eval"])
    assert args.func(args) == 1
    assert "error: the loss is inf" in capsys.readouterr().err


def test_the_trained_steps_are_saved_when_the_final_evaluation_fails(tmp_path, data_dir, fake_steps, monkeypatch):
    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("out of memory in the evaluation")

    monkeypatch.setattr(loop, "run_evaluation", broken_evaluation)
    config = _config(tmp_path, data_dir, steps=3, checkpoint_every=10)
    with pytest.raises(RuntimeError, match="out of memory"):
        loop.train(config)
    assert _saved_steps(config) == [3]  # a rerun resumes at the end and only evaluates


@pytest.mark.parametrize("override, message", [
    ("eval.batch_size=3", "eval.batch_size 3 must be a multiple of the 4 devices"),
    ("data.eval_split=val", "long_range has no split 'val'"),
])
def test_a_bad_evaluation_setting_fails_before_the_training(tmp_path, data_dir, fake_steps, override, message):
    taken, _ = fake_steps
    config = _config(tmp_path, data_dir, override, steps=3)
    with pytest.raises(ValueError, match=message):
        loop.train(config)
    assert taken == []


@pytest.mark.slow
def test_a_resume_does_not_need_the_initial_weights(tmp_path, data_dir, fake_steps):
    # The converted weights a run started from may be gone (scratch space) when it resumes.
    loop.train(_config(tmp_path, data_dir, steps=2), evaluate_at_end=False)
    config = _config(tmp_path, data_dir, f"train.init_from={tmp_path / 'deleted_weights'}", steps=3)
    assert loop.train(config, evaluate_at_end=False).step == 3


def test_init_from_a_missing_folder_or_a_training_run_says_what_it_is(tmp_path, data_dir):
    config = _config(tmp_path, data_dir)
    with pytest.raises(FileNotFoundError, match=r"train.init_from .*missing does not exist.*`ccnet convert`"):
        loop.build_state(config, make_mesh(), init_from=str(tmp_path / "missing"))
    run = tmp_path / "earlier_run"
    (run / "checkpoints").mkdir(parents=True)
    config_lib.save(config, run / "config.json")
    with pytest.raises(config_lib.ConfigError, match=r"training run's workdir.*--workdir .*earlier_run"):
        loop.build_state(config, make_mesh(), init_from=str(run))


def test_path_options_are_paths_not_json(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loop, "train", lambda config, evaluate_at_end: seen.append(config) or
                        loop.RunResult(0, None, None, False))
    monkeypatch.setattr(loop, "enable_compilation_cache", lambda directory: None)
    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps({"data": {"name": "cityscapes"}, "model": {"num_classes": 19}}))
    args = build_parser(["train"]).parse_args(
        ["train", "--config", str(config_path), "--data-dir", "2024", "--init-from", "null"])
    assert args.func(args) == 0
    assert (seen[-1].data.data_dir, seen[-1].train.init_from) == ("2024", "null")


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "train.seed must be >= 0"),
    ("train.learning_rate=Infinity", "train.learning_rate must be a finite number"),
    ("train.weight_decay=1e400", "train.weight_decay must be a finite number"),
    ("data.scales=[0.5,NaN]", "data.scales must be a finite number"),
])
def test_values_no_run_can_use_fail_when_read(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(None, [override])


@pytest.mark.parametrize("text", ["null", "[1, 2]", "3"])
def test_a_config_file_that_is_not_an_object_is_refused_by_name(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(config_lib.ConfigError, match=r"c.json must hold a JSON object of sections"):
        config_lib.load(path)


def test_the_first_log_line_does_not_claim_a_speed_it_has_not_measured(capsys):
    progress = Progress(3, 4, 0, None)
    progress.restart_clock(1)  # as the loop does after the first (compiling) step
    progress.log(1, {"loss": 1.0})
    line = capsys.readouterr().out
    assert "? img/s" in line and "0.0 img/s" not in line
