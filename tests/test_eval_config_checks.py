"""Settings and data that cannot give a meaningful result are refused by name: an evaluation of a split
without labels, an image whose label is of another size, and OHEM groups that do not divide the batch
(before the model is built)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ccnet_jax.cli import main
from ccnet_jax.data import fakes, prepare
from ccnet_jax.data.pipeline import PipelineConfig, make_eval_iterator
from ccnet_jax.data.transforms import EvalConfig, EvalTransform
from ccnet_jax.evaluation import metrics
from ccnet_jax.evaluation.evaluate import evaluate, make_predict_fn
from ccnet_jax.evaluation.inference import InferenceConfig
from ccnet_jax.train import loop
from ccnet_jax.train.step import make_mesh
from tests.converted_models import converted_tiny_ccnet
from tests.train_helpers import tiny_config


class PointwiseParts:
    """Stands in for ModelParts: logits = image @ params, pixel by pixel."""

    def model(self, params, batch_stats, *, train):
        return lambda x: (jnp.einsum("bhwc,ck->bhwk", x, params), None)


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """(prepared data folder, converted 19-class CCNet): fake Cityscapes whose test labels are all
    labelId 0 (unlabeled), as the real archive's are, so every test pixel is the ignore label."""
    root = tmp_path_factory.mktemp("cityscapes")
    manual = root / "manual"
    written = fakes.write_cityscapes(manual, counts={"train": 1, "val": 1, "test": 2}, as_zip=False)
    for relative, arrays in written.items():
        if relative.startswith("test/"):
            stem = relative.removesuffix("_leftImg8bit.png")
            label = manual / "gtFine" / f"{stem}_gtFine_labelIds.png"
            Image.fromarray(np.zeros_like(arrays["label_ids"])).save(label)
    prepare("cityscapes", root / "data", manual_dir=manual)
    return root / "data", converted_tiny_ccnet(root / "model", num_classes=19, seed=5)


def test_eval_of_a_split_without_labels_is_refused_and_names_ccnet_predict(cityscapes, capsys):
    data, model = cityscapes
    assert main(["eval", "--checkpoint", str(model), "--data-dir", str(data), "--split", "test"]) == 1
    captured = capsys.readouterr()
    assert "mIoU" not in captured.out
    err = captured.err
    assert "split 'test' of cityscapes has no labels" in err and "ignore label 255" in err
    predict = f"ccnet predict --checkpoint {model} --split test --output-dir DIR --count N`, with the same --data-dir"
    assert predict in err
    assert "pass --output-dir DIR to `ccnet eval`" in err  # which writes every image's prediction


def test_eval_of_a_split_without_labels_writes_its_predictions_with_no_mIoU(cityscapes, tmp_path, capsys):
    # `ccnet eval --split test --output-dir` is how the Cityscapes server's labelIds PNGs are written.
    data, model = cityscapes
    out = tmp_path / "server"
    assert main(["eval", "--checkpoint", str(model), "--data-dir", str(data), "--split", "test",
                 "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "mIoU" not in captured.out and "nan" not in captured.out
    assert "split 'test' of cityscapes has no labels" in captured.err and "no mIoU" in captured.err
    assert f"{out / 'submission'} (the cityscapes benchmark's format)" in captured.err
    assert len(list((out / "colour").glob("*.png"))) == 2
    submission = out / "submission"
    assert sorted(p.name for p in submission.iterdir()) == ["berlin_000000_000019_labelIds.png",
                                                             "berlin_000001_000020_labelIds.png"]
    # cityscapesScripts' getPrediction walks the folder recursively and refuses a second
    # `{city}_{seq}_{frame}*.png`: each image has exactly one match there.
    for stem in ("berlin_000000_000019", "berlin_000001_000020"):
        assert [p.name for p in submission.rglob(f"{stem}*.png")] == [f"{stem}_labelIds.png"]


def test_evaluate_refuses_images_whose_labels_are_all_ignored():
    # A library caller evaluating a prefix with no labelled pixel gets an error, not a NaN mIoU.
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "label": np.full((6, 8), 255, np.uint8),
               "file_name": f"{i}.png"} for i in range(4)]
    mesh = make_mesh()
    predict = make_predict_fn(PointwiseParts(), InferenceConfig(), 3, mesh)
    params = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    with make_eval_iterator(source, PipelineConfig(global_batch_size=4), EvalConfig(), mesh) as batches:
        with pytest.raises(ValueError, match=r"no labelled pixel in the 1 evaluated batch.*ignore label 255"):
            evaluate(predict, params, None, batches, 3)
    # metrics.mean_iou keeps its documented convention: NaN when no class has an IoU.
    assert math.isnan(metrics.mean_iou(np.zeros((3, 3), np.int64)))


@pytest.mark.parametrize("resize", [None, (60, 60)])
def test_an_image_and_label_of_different_sizes_are_refused_by_name(resize):
    element = {"image": np.zeros((100, 120, 3), np.uint8), "label": np.zeros((50, 60), np.uint8),
               "file_name": "city/x_leftImg8bit.png"}
    with pytest.raises(ValueError, match=r"city/x_leftImg8bit.png: its image is 100x120 but its label 50x60"):
        EvalTransform(EvalConfig(resize=resize)).map(element)


def test_a_mismatched_pair_of_a_custom_source_stops_the_evaluation_iterator_by_name():
    # eval_resize sizes the image from the image; the label keeps its size (scores are taken there).
    source = [{"image": np.zeros((40, 80, 3), np.uint8), "label": np.zeros((40, 80), np.uint8), "file_name": "a"},
              {"image": np.zeros((40, 80, 3), np.uint8), "label": np.zeros((80, 40), np.uint8), "file_name": "b"}]
    config = EvalConfig(resize=(40, 20))  # fits 40x80 inside (long 40, short 20): 20x40
    out = EvalTransform(config).map(source[0])
    assert (out["height"], out["width"], out["label_height"], out["label_width"]) == (20, 40, 40, 80)
    with make_eval_iterator(source, PipelineConfig(global_batch_size=2), config) as batches:
        with pytest.raises(ValueError, match="b: its image is 40x80 but its label 80x40"):
            next(batches)


class _ModelBuilt(Exception):
    """Raised where training would build the model: whatever is checked before it has passed."""


@pytest.fixture
def stop_at_model(monkeypatch):
    def build_state(*args, **kwargs):
        raise _ModelBuilt

    monkeypatch.setattr(loop, "build_state", build_state)
    # In-process: a compilation cache set here would stay set for the other tests of this process.
    monkeypatch.setattr(loop, "enable_compilation_cache", lambda directory: None)


@pytest.mark.parametrize("group, fits, batch", [(3, 2, 12), (8, 4, 8)])
def test_ohem_groups_that_do_not_divide_the_batch_are_refused_before_the_model_is_built(
        group, fits, batch, data_dir, tmp_path, stop_at_model, capsys):
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", batch_size=4, ohem=True,
                         ohem_images_per_group=group)
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"train.ohem_images_per_group {group} does not divide train.batch_size 4" in err
    assert f"--set train.ohem_images_per_group={fits}" in err and f"--set train.batch_size={batch}" in err


def test_ohem_groups_are_not_checked_when_ohem_is_off(data_dir, tmp_path, stop_at_model):
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", batch_size=4, ohem=False,
                         ohem_images_per_group=3)
    with pytest.raises(_ModelBuilt):
        main(["train", "--config", str(config)])


def test_micro_batches_that_do_not_divide_over_the_devices_are_refused_before_the_model_is_built(
        data_dir, tmp_path, stop_at_model, capsys):
    assert jax.device_count() == 4
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", batch_size=4)
    assert main(["train", "--config", str(config), "--set", "train.accumulate_steps=2"]) == 1
    err = capsys.readouterr().err
    assert "train.batch_size 4 does not split into train.accumulate_steps 2 micro-batches" in err
    assert "--set train.accumulate_steps=1" in err and "--set train.batch_size=8" in err


def test_ohem_groups_must_divide_each_micro_batch(data_dir, tmp_path, stop_at_model, capsys):
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", batch_size=8, ohem=True,
                         ohem_images_per_group=3, accumulate_steps=2)
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert ("train.ohem_images_per_group 3 does not divide the micro-batch of 4 images (train.batch_size 8 / "
            "train.accumulate_steps 2)") in err
    assert "--set train.ohem_images_per_group=2" in err and "--set train.batch_size=24" in err
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", batch_size=8, ohem=True,
                         ohem_images_per_group=2, accumulate_steps=2)
    with pytest.raises(_ModelBuilt):
        main(["train", "--config", str(config)])


def test_the_training_loop_steps_in_the_configured_micro_batches(data_dir, tmp_path, monkeypatch):
    seen = []

    def make_train_step(*args, accumulate_steps=1, **kwargs):
        seen.append(accumulate_steps)
        raise _ModelBuilt

    monkeypatch.setattr(loop, "make_train_step", make_train_step)
    monkeypatch.setattr(loop, "enable_compilation_cache", lambda directory: None)
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", batch_size=8, accumulate_steps=2)
    with pytest.raises(_ModelBuilt):
        main(["train", "--config", str(config)])
    assert seen == [2]
