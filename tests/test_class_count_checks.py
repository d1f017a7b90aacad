"""A model's class count and its dataset's: a config that leaves model.num_classes out takes the dataset's,
and a model of another count is refused by train, eval and predict before any data is generated or any
model is built; and a training example whose image and label differ in size is refused by name."""

import json

import numpy as np
import pytest
from PIL import Image

from ccnet_jax import config as config_lib
from ccnet_jax.cli import main
from ccnet_jax.data import DATASETS, dataset_spec
from ccnet_jax.data.pipeline import PipelineConfig, make_train_iterator
from ccnet_jax.data.transforms import EvalConfig, EvalTransform, TrainAugmentConfig, TrainTransform
from ccnet_jax.train import loop
from tests.converted_models import converted_tiny_ccnet

LONG_RANGE_CLASSES = dataset_spec("long_range").num_classes


class _ModelBuilt(Exception):
    """Raised where a command would build the model: whatever is checked before it has passed."""


@pytest.fixture
def built(monkeypatch):
    """The configs the commands build models for (each build then stops with _ModelBuilt)."""
    configs = []

    def build_state(config, *args, **kwargs):
        configs.append(config)
        raise _ModelBuilt

    monkeypatch.setattr(loop, "build_state", build_state)
    # In-process: a compilation cache set here would stay set for the other tests of this process.
    monkeypatch.setattr(loop, "enable_compilation_cache", lambda directory: None)
    return configs


@pytest.fixture(scope="module")
def cityscapes_model(tmp_path_factory):
    """A converted CCNet of Cityscapes' 19 classes, as `ccnet convert` makes of the authors' model."""
    return converted_tiny_ccnet(tmp_path_factory.mktemp("model"), num_classes=19, seed=1)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_config_without_model_num_classes_takes_its_datasets(name, tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"model": {"width": 8}, "data": {"name": name}}))
    assert config_lib.load(file).model.num_classes == dataset_spec(name).num_classes
    assert config_lib.load(None, [f"data.name={name}"]).model.num_classes == dataset_spec(name).num_classes


def test_the_default_config_agrees_with_its_own_dataset():
    default = config_lib.ExperimentConfig()
    assert default.model.num_classes == dataset_spec(default.data.name).num_classes
    assert config_lib.load(None) == default


def test_an_explicit_class_count_is_kept_as_written_and_saved():
    # Configs saved by every version hold model.num_classes; it is read as written, never replaced.
    saved = {"model": {"num_classes": 19}, "data": {"name": "long_range"}}
    assert config_lib.from_dict(saved).model.num_classes == 19
    ade = config_lib.load(None, ["data.name=ade20k"])
    assert config_lib.load(ade.to_dict(), ["data.name=cityscapes"]).model.num_classes == 150


def test_train_naming_only_the_dataset_builds_and_saves_a_model_of_its_classes(data_dir, tmp_path, built):
    run = tmp_path / "run"
    with pytest.raises(_ModelBuilt):
        main(["train", "--set", "data.name=long_range", "--set", "data.builder_config=tiny", "--data-dir",
              str(data_dir), "--workdir", str(run), "--set", "train.init_from=none"])
    assert [config.model.num_classes for config in built] == [LONG_RANGE_CLASSES]
    assert json.loads((run / "config.json").read_text())["model"]["num_classes"] == LONG_RANGE_CLASSES


def _refused(err: str, model_classes: int) -> bool:
    return (f"model.num_classes is {model_classes} but long_range has {LONG_RANGE_CLASSES} classes" in err
            and f"--set model.num_classes={LONG_RANGE_CLASSES}" in err)


@pytest.mark.parametrize("classes", [19, 3])  # more classes than the labels have, and fewer
def test_train_refuses_another_class_count_before_generating_data(classes, tmp_path, built, capsys):
    data = tmp_path / "data"
    assert main(["train", "--set", f"model.num_classes={classes}", "--set", "data.builder_config=tiny",
                 "--data-dir", str(data), "--workdir", str(tmp_path / "run"), "--set", "train.init_from=none"]) == 1
    assert _refused(capsys.readouterr().err, classes)
    assert not data.exists() and not (tmp_path / "run").exists() and not built


def test_eval_refuses_a_cityscapes_model_on_long_range_before_building_it(cityscapes_model, data_dir, built,
                                                                          capsys):
    assert main(["eval", "--checkpoint", str(cityscapes_model), "--set", "data.name=long_range", "--set",
                 "data.builder_config=tiny", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert _refused(err, 19) and "--set data.name=cityscapes" in err and not built


def test_predict_on_a_split_refuses_another_class_count_before_generating_data(cityscapes_model, tmp_path, built,
                                                                               capsys):
    data = tmp_path / "data"
    assert main(["predict", "--checkpoint", str(cityscapes_model), "--set", "data.name=long_range", "--set",
                 "data.builder_config=tiny", "--data-dir", str(data), "--output-dir", str(tmp_path / "out")]) == 1
    assert _refused(capsys.readouterr().err, 19)
    assert not data.exists() and not built


def test_a_cityscapes_model_predicts_image_files_without_a_dataset(cityscapes_model, tmp_path, built):
    image = tmp_path / "street.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image)
    with pytest.raises(_ModelBuilt):
        main(["predict", "--checkpoint", str(cityscapes_model), "--images", str(image), "--output-dir",
              str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert [config.model.num_classes for config in built] == [19]
    assert not (tmp_path / "data").exists()


def _mismatched(name: str, image: tuple[int, int] = (40, 60), label: tuple[int, int] = (20, 30)) -> dict:
    return {"image": np.zeros((*image, 3), np.uint8), "label": np.zeros(label, np.uint8), "file_name": name}


# A label smaller than its image, larger, and transposed (a portrait photo's label left landscape).
@pytest.mark.parametrize("image, label", [((40, 60), (20, 30)), ((20, 30), (40, 60)), ((30, 20), (20, 30))])
def test_train_transform_refuses_an_image_and_label_of_different_sizes_as_evaluation_does(image, label):
    element = _mismatched("city/a.png", image, label)
    train = TrainTransform(TrainAugmentConfig(crop_size=(16, 16), scales=(1.0,)))
    sizes = f"its image is {image[0]}x{image[1]} but its label {label[0]}x{label[1]}"
    with pytest.raises(ValueError, match=f"city/a.png: {sizes}") as refused:
        train.random_map(element, np.random.default_rng(0))
    with pytest.raises(ValueError) as evaluated:
        EvalTransform(EvalConfig()).map(element)
    assert str(refused.value) == str(evaluated.value)


def test_a_mismatched_pair_of_a_custom_source_stops_the_training_iterator_by_name():
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 255, (20, 30, 3), np.uint8), "label": np.zeros((20, 30), np.uint8),
               "file_name": f"ok_{i}"} for i in range(3)] + [_mismatched("odd")]
    augment = TrainAugmentConfig(crop_size=(16, 16), scales=(1.0,))
    with make_train_iterator(source, PipelineConfig(global_batch_size=4), augment) as batches:
        with pytest.raises(ValueError, match="odd: its image is 40x60 but its label 20x30"):
            next(batches)
