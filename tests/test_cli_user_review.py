"""A command-line user's mistakes with eval, predict and export: refused early, with what to fix.

Where a mistake must be refused before the model is loaded or a dataset generated, those steps are
replaced by ones that fail the test, so that the test also stays quick.
"""

import numpy as np
import pytest
from PIL import Image

from ccnet_jax import exported_loader
from ccnet_jax.cli import main as cli_main
from ccnet_jax.commands import options, restore
from ccnet_jax.evaluation.attention import attention_panels
from tests.converted_models import converted_tiny_ccnet

# A small model, so that building it before the checkpoint is read takes a moment.
TINY = ["--set", "model.width=8", "--set", "model.blocks=[1,1,1,1]", "--set", "model.implementation=xla"]


def never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the mistake was reported")

    return fail


@pytest.fixture()
def no_loading(monkeypatch, tmp_path):
    """Loading weights or generating data fails the test: the commands must refuse the mistake before."""
    monkeypatch.setattr(restore, "load_weights", never("the weights were loaded"))
    monkeypatch.setattr(options, "ensure_generated_data", never("a dataset was generated"))
    monkeypatch.chdir(tmp_path)  # the default config's data folder is ./data


@pytest.mark.parametrize("command", [["eval"], ["predict", "--output-dir", "pictures"]])
def test_a_folder_without_a_checkpoint_is_refused_before_a_dataset_is_generated(tmp_path, monkeypatch, capsys,
                                                                                command):
    # A typo'd or empty folder has no saved config, so the default one names the full long_range
    # dataset (3000 images): it was generated first, and only then the folder was found empty.
    monkeypatch.setattr(options, "ensure_generated_data", never("a dataset was generated"))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli_main([*command, "--checkpoint", "empty", "--data-dir", str(tmp_path / "data"), *TINY]) == 1
    assert "empty holds no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["predict", "--output-dir", "pictures"]])
def test_an_unknown_split_is_refused_before_the_weights_are_loaded(tmp_path, monkeypatch, capsys, no_loading,
                                                                   command):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli_main([*command, "--checkpoint", "run", "--split", "val", *TINY]) == 1
    assert "long_range has no split 'val'; pass --split with one of train, validation, test" in capsys.readouterr().err


def test_predict_on_images_names_a_checkpoint_file_as_a_file(tmp_path, capsys, no_loading):
    # It said "checkpoint folder ... does not exist" of a file that exists (a .pth not converted yet).
    (tmp_path / "weights.pth").write_bytes(b"not a folder")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    assert cli_main(["predict", "--checkpoint", str(tmp_path / "weights.pth"), "--images", str(tmp_path / "photo.png"),
                     "--output-dir", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "ccnet convert FILE FOLDER" in err


@pytest.mark.parametrize("split", [False, True])
def test_predict_refuses_an_output_dir_under_a_file_before_loading(tmp_path, capsys, no_loading, split):
    # It failed after loading the model, with "[Errno 17] File exists".
    (tmp_path / "run").mkdir()
    (tmp_path / "taken").write_text("a file")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    images = [] if split else ["--images", str(tmp_path / "photo.png")]
    for output, where in ((tmp_path / "taken", "is a file"),
                          (tmp_path / "taken" / "sub", f"lies under the file {tmp_path / 'taken'}")):
        assert cli_main(["predict", "--checkpoint", str(tmp_path / "run"), *images, "--output-dir", str(output),
                         *TINY]) == 1
        assert f"--output-dir {output} {where}; pass a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval", "--output-dir"], ["export", "--output"]])
def test_eval_and_export_refuse_an_output_folder_under_a_file_before_loading(tmp_path, capsys, no_loading,
                                                                             command):
    # check_output_folder refused only the file itself; a folder under it failed once writing began.
    (tmp_path / "run").mkdir()
    (tmp_path / "taken").write_text("a file")
    output = tmp_path / "taken" / "sub"
    assert cli_main([command[0], "--checkpoint", str(tmp_path / "run"), command[1], str(output), *TINY]) == 1
    assert f"{command[1]} {output} lies under the file {tmp_path / 'taken'}; pass a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file"


def test_predict_refuses_files_none_of_which_is_an_image_before_loading(tmp_path, capsys, no_loading):
    # The model was loaded and compiled first, to end in "wrote 0 pictures of 0 images".
    (tmp_path / "notes.txt").write_text("no image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing")
    assert cli_main(["predict", "--checkpoint", str(tmp_path), "--images", str(tmp_path / "notes.txt"),
                     str(tmp_path / "broken.png"), "--output-dir", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "none of the 2 file(s) given to --images is a readable image" in err
    assert f"skipped {tmp_path / 'notes.txt'}: not a readable image" in err


def test_the_attention_picture_of_a_long_thin_image_stays_viewable():
    # A 2x400 strip was enlarged 128 times into a 256x153608 picture (a 2x4000 one into gigabytes).
    rgb = np.zeros((2, 400, 3), np.uint8)
    weights = np.ones((1, 50), np.float32)
    picture = attention_panels(rgb, weights, weights, (0, 0))
    assert picture.shape[1] <= 4096 and picture.shape[0] >= 2
    # Small pictures are still enlarged to be looked at, as before.
    assert attention_panels(np.zeros((97, 129, 3), np.uint8), weights, weights, (0, 0)).shape == (291, 3 * 387 + 8, 3)


def test_the_shipped_loader_names_a_folder_without_an_export(tmp_path, capsys):
    # It ended in a FileNotFoundError traceback.
    with pytest.raises(SystemExit) as stopped:
        exported_loader.main(["--images", "x.png", "--output-dir", str(tmp_path / "out"),
                              "--model-dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"{tmp_path} has no ccnet.jax or ccnet_export.json" in capsys.readouterr().err


def test_the_shipped_loader_segments_a_folder_and_skips_its_own_pictures(tmp_path, capsys):
    # A folder was "skipped: Is a directory", though `ccnet predict --images` takes folders.
    model = tmp_path / "export"
    converted = converted_tiny_ccnet(tmp_path / "model", seed=3)
    assert cli_main(["export", "--checkpoint", str(converted), "--output", str(model), "--height", "16",
                     "--width", "16"]) == 0
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(photos / "a.png")
    Image.fromarray(np.zeros((10, 6, 3), np.uint8)).save(photos / "more" / "b.jpg")
    (photos / "notes.txt").write_text("not an image, not taken from a folder")
    out = photos / "segmented"
    command = ["--images", str(photos), "--output-dir", str(out), "--model-dir", str(model)]
    assert exported_loader.main(command) == 0
    written = {p.name for p in out.iterdir()}
    assert written == {"a_trainIds.png", "a_colour.png", "b_trainIds.png", "b_colour.png"}
    assert Image.open(out / "b_trainIds.png").size == (6, 10)
    capsys.readouterr()
    # A rerun would replace the pictures: refused, naming them, unless --force.
    with pytest.raises(SystemExit) as stopped:
        exported_loader.main(command)
    assert stopped.value.code == 2 and f"4 picture(s) in {out} would be replaced" in capsys.readouterr().err
    assert exported_loader.main([*command, "--force"]) == 0  # and does not segment the pictures in segmented/
    assert {p.name for p in out.iterdir()} == written and len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("split", [False, True])
def test_predict_refuses_to_replace_pictures_before_loading(tmp_path, capsys, no_loading, split):
    # predict replaced same-named pictures of an earlier run without a word, unlike eval and export.
    (tmp_path / "run").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    output = tmp_path / "out"
    output.mkdir()
    (output / ("photo_colour.png" if not split else "road_prediction.png")).write_bytes(b"earlier")
    images = [] if split else ["--images", str(tmp_path / "photo.png")]
    assert cli_main(["predict", "--checkpoint", str(tmp_path / "run"), *images, "--output-dir", str(output),
                     *TINY]) == 1
    err = capsys.readouterr().err
    if split:
        assert f"--output-dir {output} is not empty" in err and "--force to replace pictures" in err
    else:
        assert f"1 picture(s) in --output-dir {output} would be replaced (photo_colour.png)" in err
        assert "--force to replace them" in err
    # Pictures this run would not write are no reason to refuse.
    if not split:
        (output / "photo_colour.png").rename(output / "other_colour.png")
        with pytest.raises(AssertionError, match="the weights were loaded"):
            cli_main(["predict", "--checkpoint", str(tmp_path / "run"), *images, "--output-dir", str(output), *TINY])


def test_a_set_list_split_by_the_shell_says_to_quote_it(capsys):
    # The shell splits `--set model.blocks=[1, 1, 1, 1]` at its spaces; argparse named "1, 1, 1]" alone.
    with pytest.raises(SystemExit) as stopped:
        cli_main(["train", "--set", "model.blocks=[1,", "1,", "1,", "1]"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: 1, 1, 1]; quote a --set value with spaces" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--bogus"])
    assert capsys.readouterr().err.rstrip().endswith("unrecognized arguments: --bogus")
