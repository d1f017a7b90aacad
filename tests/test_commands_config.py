"""How eval, predict and export find their config: --config, a run's saved one, or a converted folder."""

import argparse
import json
import threading

import pytest

from ccnet_jax import config as config_lib
from ccnet_jax import numpy_reference as ref
from ccnet_jax.commands.eval import resolve_config
from tests.converted_models import converted_tiny_ccnet


def args_for(checkpoint, *overrides, config=None, workdir=None):
    return argparse.Namespace(config=config, checkpoint=checkpoint, overrides=list(overrides), workdir=workdir,
                              data_dir=None)


def test_a_runs_saved_config_takes_overrides_including_workdir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = config_lib.load(None, ["model.num_classes=10", "eval.mode=sliding"])
    config_lib.save(saved, run / "config.json")
    config = resolve_config(args_for(run, "workdir=elsewhere", "eval.flip=true"))
    assert config.workdir == "elsewhere" and config.eval.flip and config.eval.mode == "sliding"
    assert resolve_config(args_for(run, workdir="there")).workdir == "there"


def test_a_saved_config_is_never_read_half_written(tmp_path):
    # Every process of a resumed multi-process run reads WORKDIR/config.json while process 0 rewrites it.
    path = tmp_path / "config.json"
    config = config_lib.load(None, ["model.num_classes=10"])
    config_lib.save(config, path)
    whole = path.read_text()
    stop = threading.Event()

    def rewrite():
        while not stop.is_set():
            config_lib.save(config, path)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = {path.read_text() for _ in range(2000)}
    finally:
        stop.set()
        writer.join()
    assert reads == {whole}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_converted_folder_gives_its_model_and_the_dataset_of_its_classes(tmp_path):
    converted = converted_tiny_ccnet(tmp_path, num_classes=19, seed=2)
    config = resolve_config(args_for(converted))
    assert config.data.name == "cityscapes"
    assert (config.model.num_classes, config.model.width, tuple(config.model.blocks)) == (19, 4, ref.TINY_BLOCKS)
    metadata = json.loads((converted / "config.json").read_text())
    metadata["kind"] = "resnet"
    (converted / "config.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="backbone .ResNet. only"):
        resolve_config(args_for(converted))
