"""`ccnet train / eval / predict` end to end on tiny data; the shipped configs run a few steps."""

import re

import pytest
from PIL import Image

from ccnet_jax import config as config_lib
from ccnet_jax.data import fakes, prepare
from ccnet_jax.data.transforms import AUTHORS_SCALES
from ccnet_jax.train.loop import check_initialisation
from tests.train_helpers import REPO, ccnet, tiny_config

CONFIGS = REPO / "experiments" / "configs"


def _tensorboard_tags(logdir) -> set[str]:
    """Tags of every summary in the event files of `logdir` (TFRecord framing read by hand)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            length = int.from_bytes(data[at : at + 8], "little")
            event = Event.FromString(data[at + 12 : at + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            at += 12 + length + 4
    return tags


@pytest.mark.slow
def test_train_eval_predict_end_to_end(tmp_path):
    data = tmp_path / "data"
    config = tiny_config(tmp_path / "c.json", data, tmp_path / "run", steps=3, checkpoint_every=10)
    trained = ccnet("train", "--config", str(config))  # prepares the generated data itself
    lines = trained.stdout.strip().splitlines()
    assert lines[-1].startswith("mIoU: ") and 0.0 <= float(lines[-1].split()[1]) <= 1.0
    assert any(line.startswith("step 3/3") and "img/s" in line and "ETA" in line for line in lines)
    assert "block_blue" in trained.stdout
    assert "OpenCV is not installed" not in trained.stderr  # tfds' advice, measured not to apply
    tags = _tensorboard_tags(tmp_path / "run" / "tensorboard")
    assert {"train/loss", "train/grad_norm", "perf/images_per_second", "val/miou", "val/iou/block_blue"} <= tags
    assert {"val/prediction", "val/attention"} <= tags  # pictures

    # The compiled programs persist in the run's folder, for a restart after preemption.
    assert any((tmp_path / "run" / "jax_cache").iterdir())

    evaluated = ccnet("eval", "--checkpoint", str(tmp_path / "run"), "--set", "eval.mode=sliding",
                      "--set", "eval.crop_size=[64,64]", "--set", "eval.stride=[32,48]",
                      "--output-dir", str(tmp_path / "out"))
    assert evaluated.stdout.strip().splitlines()[-1].startswith("mIoU: ")
    # What was scored: which weights, which data.
    assert f"weights: {tmp_path / 'run' / 'checkpoints' / '3'} (step 3)" in evaluated.stderr
    assert "scored: long_range/tiny, split 'validation'" in evaluated.stderr
    assert re.search(r"eval batch (\d+)/\1 .* ETA \d+:\d\d:\d\d", evaluated.stderr)
    assert len(list((tmp_path / "out" / "colour").glob("*.png"))) == 4

    ccnet("predict", "--checkpoint", str(tmp_path / "run"), "--output-dir", str(tmp_path / "pictures"),
          "--count", "1", "--pixel", "40,60")
    attention = list((tmp_path / "pictures").glob("*_attention.png"))
    assert len(attention) == 1
    assert Image.open(attention[0]).size == (3 * 3 * 129 + 2 * 4, 3 * 97)  # three 97x129 panels, enlarged 3x


def test_resnet101_recipes_need_imagenet_weights_or_an_explicit_none(tmp_path):
    result = ccnet("train", "--config", str(CONFIGS / "cityscapes_r101_769.json"), "--workdir", str(tmp_path / "r"),
                   check=False)
    assert result.returncode == 1
    assert "resnet101-imagenet.pth" in result.stderr and "--format imagenet-deep" in result.stderr
    assert "train.init_from=none" in result.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
    config = config_lib.load(CONFIGS / "cityscapes_r101_769.json", ["train.init_from=none"])
    check_initialisation(config)  # on purpose: accepted


def test_bad_inputs_say_what_to_fix(tmp_path):
    result = ccnet("train", "--config", str(tmp_path / "missing.json"), check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = ccnet("train", "--config", str(config_lib.DEMO_CONFIG_FILE), "--set", "train.stepz=3", check=False)
    assert result.returncode == 1 and "unknown field(s) train.stepz" in result.stderr
    with pytest.raises(config_lib.ConfigError, match="train.batch_size must be an integer"):
        config_lib.load(None, ["train.batch_size=two"])


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every must be > 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be > 0"),
    ("train.keep=0", "train.keep must be > 0"),
    ("train.momentum=1.5", "train.momentum must be between 0 and 1"),
    ("eval.stride=[0,8]", "eval.crop_size and eval.stride must be positive"),
    ("eval.scales=[]", "eval.scales must be positive numbers"),
    ("eval.pad_to=[0,8]", "eval.pad_to must be > 0"),
    ("data.scales=[1.0,-0.5]", "data.scales must be > 0"),
])
def test_out_of_range_settings_fail_when_read(override, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.load(config_lib.DEMO_CONFIG_FILE, [override])


def test_demo_config_ships_inside_the_package():
    import tomllib
    from fnmatch import fnmatch

    package = REPO / "ccnet_jax"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ccnet_jax"]
    relative = config_lib.DEMO_CONFIG_FILE.relative_to(package).as_posix()
    assert any(fnmatch(relative, pattern) for pattern in patterns)
    demo = config_lib.load(config_lib.DEMO_CONFIG_FILE)
    assert demo.data.name == "long_range" and demo.model.recurrence == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cityscapes_r101_769", "ade20k_r101_512"])
def test_shipped_configs_run_a_few_steps_on_fake_data(tmp_path, name):
    dataset = "cityscapes" if name.startswith("cityscapes") else "ade20k"
    manual = tmp_path / "manual"
    writer = fakes.write_cityscapes if dataset == "cityscapes" else fakes.write_ade20k
    writer(manual, size=(40, 56))
    prepare(dataset, tmp_path / "data", manual, None)
    config = config_lib.load(CONFIGS / f"{name}.json")
    assert config.train.steps > 1000 and config.model.depth == 101
    if dataset == "cityscapes":
        assert (config.train.batch_size, config.train.steps, config.train.learning_rate) == (8, 60000, 0.01)
        assert config.train.weight_decay == 1e-4 and config.train.ohem and config.data.crop_size == (769, 769)
        assert config.data.scales == AUTHORS_SCALES
    result = ccnet(
        "train", "--config", str(CONFIGS / f"{name}.json"), "--data-dir", str(tmp_path / "data"),
        "--workdir", str(tmp_path / "run"),
        "--set", "model.width=8",
        "--set", "model.blocks=[1,1,1,1]", "--set", "model.implementation=xla",
        "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.ohem_min_kept=100",
        "--set", "data.crop_size=[32,32]", "--set", "data.num_workers=0",
        # ADE20K's 2048x512 resizes would blow the 40x56 fakes up to 512 pixels: keep them small.
        "--set", "data.base_size=null", "--set", "data.eval_resize=null",
        "--set", "eval.crop_size=[32,32]", "--set", "eval.stride=[24,24]", "--set", "eval.max_images=4",
        devices=2,
    )
    assert result.stdout.strip().splitlines()[-1].startswith("mIoU: ")


@pytest.mark.slow
def test_converted_weights_start_training_and_evaluate(tmp_path):
    import jax
    import numpy as np
    from flax import nnx

    from ccnet_jax.convert import inplace_abn_scale, torch_state_dict
    from ccnet_jax.train.loop import build_state
    from ccnet_jax.train.state import build_model
    from ccnet_jax.train.step import make_mesh

    data = tmp_path / "data"
    prepare("long_range", data, None, "tiny")
    config_path = tiny_config(tmp_path / "c.json", data, tmp_path / "run")
    config = config_lib.load(config_path)
    source = build_model(config.model, seed=5)
    np.savez(tmp_path / "weights.npz", **torch_state_dict(source, num_batches_tracked=False))
    ccnet("convert", str(tmp_path / "weights.npz"), str(tmp_path / "converted"))

    # train.init_from puts the converted weights into the step-0 state, all of them (BatchNorm
    # weights as the authors' InPlaceABN scale, |weight| + 1e-5).
    state = build_state(config, make_mesh(), init_from=str(tmp_path / "converted"))[1]
    wanted = [(path, np.asarray(v[...])) for path, v in nnx.to_flat_state(nnx.state(source, nnx.Param))]
    for got, (path, want) in zip(jax.tree.leaves(state.params), wanted):
        want = inplace_abn_scale(want) if path[-1] == "scale" else want
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))
    fresh = build_state(config, make_mesh())[1]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh.params)))

    trained = ccnet("train", "--config", str(config_path), "--init-from", str(tmp_path / "converted"), "--no-eval")
    assert "step 6/6" in trained.stdout
    evaluated = ccnet("eval", "--checkpoint", str(tmp_path / "converted"), "--config", str(config_path))
    assert evaluated.stdout.strip().splitlines()[-1].startswith("mIoU: ")
    wrong = ccnet("eval", "--checkpoint", str(tmp_path / "converted"), "--config", str(config_path),
                  "--set", "model.blocks=[1,1,2,1]", check=False)
    assert wrong.returncode == 1 and "does not fit this model" in wrong.stderr
