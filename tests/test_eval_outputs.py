"""`ccnet eval --output-dir`'s files: colour pictures apart from the benchmark's format, which the
official scripts read (one file per image in the folder they are given, in the benchmark's numbering)."""

import numpy as np
import pytest
from PIL import Image

from ccnet_jax.cli import main
from ccnet_jax.data import ade20k, fakes, prepare
from ccnet_jax.evaluation.writers import EvalOutputs, eval_output_folders, palette, write_ade20k_ids
from tests.converted_models import converted_tiny_ccnet


def test_ade20k_ids_are_the_benchmark_numbers_one_to_150(tmp_path):
    # ADE20K's devkit scores 0 as "other": train id c is the benchmark's class c + 1.
    prediction = np.arange(ade20k.NUM_CLASSES, dtype=np.int32).reshape(10, 15)
    write_ade20k_ids(tmp_path / "ADE_val_00000001.png", prediction)
    written = Image.open(tmp_path / "ADE_val_00000001.png")
    assert written.mode == "L"
    np.testing.assert_array_equal(np.asarray(written), (prediction + 1).astype(np.uint8))


@pytest.mark.parametrize("class_id", [ade20k.NUM_CLASSES, 255])
def test_ade20k_ids_refuse_what_is_no_class_instead_of_writing_it_as_one(class_id, tmp_path):
    # A prediction is an argmax over the 150 classes; the ignore label 255 (+1 would wrap to 0,
    # "other") or a 151st class has no ADE20K number, so nothing is written.
    prediction = np.zeros((4, 5), np.uint8)
    prediction[2, 3] = class_id
    with pytest.raises(ValueError, match=rf"class id {class_id} for x.png; train ids are 0..149"):
        write_ade20k_ids(tmp_path / "x.png", prediction)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("dataset, submission", [("cityscapes", "submission"), ("ade20k", "submission"),
                                                 ("long_range", None)])
def test_each_dataset_has_a_colour_folder_and_benchmarks_a_submission_folder(dataset, submission, tmp_path):
    colour, benchmark = eval_output_folders(tmp_path, dataset)
    assert colour == tmp_path / "colour"
    assert benchmark == (tmp_path / submission if submission else None)


def test_cityscapes_outputs_keep_one_file_per_image_in_the_submission_folder(tmp_path):
    outputs = EvalOutputs(tmp_path, "cityscapes", palette("cityscapes"))
    outputs.make_folders()
    outputs.write("test/berlin/berlin_000000_000019_leftImg8bit.png", np.full((2, 3), 13, np.uint8))
    assert [p.name for p in (tmp_path / "colour").iterdir()] == ["berlin_000000_000019.png"]
    assert [p.name for p in (tmp_path / "submission").iterdir()] == ["berlin_000000_000019_labelIds.png"]
    assert np.all(np.asarray(Image.open(tmp_path / "submission" / "berlin_000000_000019_labelIds.png")) == 26)  # car


def test_eval_of_ade20k_writes_the_benchmark_numbering_in_its_submission_folder(tmp_path, capsys):
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual, counts={"training": 1, "validation": 2}, as_zip=False)
    prepare("ade20k", tmp_path / "data", manual_dir=manual)
    model = converted_tiny_ccnet(tmp_path / "model", num_classes=ade20k.NUM_CLASSES, seed=2)
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(model), "--data-dir", str(tmp_path / "data"),
                 "--set", "data.eval_resize=null", "--output-dir", str(out)]) == 0
    assert "mIoU: " in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["colour", "submission"]
    names = ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    assert sorted(p.name for p in (out / "colour").iterdir()) == names
    assert sorted(p.name for p in (out / "submission").iterdir()) == names
    for name in names:
        ids = np.asarray(Image.open(out / "submission" / name))
        assert ids.dtype == np.uint8 and ids.shape == (20, 24)  # the label's size
        assert ids.min() >= 1 and ids.max() <= ade20k.NUM_CLASSES
