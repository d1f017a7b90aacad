"""`ccnet eval` and `ccnet export` used wrongly: each mistake is named, with its fix, before any work is done
and without a traceback, and nothing already on disk is replaced without being asked."""

import pytest

from ccnet_jax.cli import main
from tests.converted_models import converted_tiny_ccnet


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted CCNet with long_range's 10 classes."""
    return converted_tiny_ccnet(tmp_path_factory.mktemp("model"), num_classes=10, seed=3)


def eval_args(checkpoint, data_dir, *more):
    return ["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data_dir),
            "--set", 'data.builder_config="tiny"', "--set", "eval.max_images=2", *more]


def test_eval_of_a_missing_checkpoint_says_so_before_preparing_any_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(eval_args(tmp_path / "runs" / "typo", tmp_path / "data")) == 1
    err = capsys.readouterr().err
    assert "checkpoint" in err and "typo does not exist" in err and "ccnet convert" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_weights_file_as_checkpoint_is_told_to_be_converted(command, tmp_path, capsys):
    weights = tmp_path / "ccnet.npz"
    weights.write_bytes(b"not a folder")
    args = (eval_args(weights, tmp_path / "data") if command == "eval"
            else ["export", "--checkpoint", str(weights), "--output", str(tmp_path / "out")])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "ccnet convert FILE FOLDER" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [["--height", "0"], ["--width", "0"]])
def test_export_refuses_a_zero_size_instead_of_using_the_default(size, converted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(converted), "--output", str(out), *size]) == 1
    assert "--height and --width must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_export_to_a_file_is_refused_by_name(converted, tmp_path, capsys):
    target = tmp_path / "model.jax"
    target.write_bytes(b"an earlier artefact")
    assert main(["export", "--checkpoint", str(converted), "--output", str(target)]) == 1
    assert f"--output {target} is a file; pass a folder" in capsys.readouterr().err
    assert target.read_bytes() == b"an earlier artefact"


def test_eval_does_not_replace_pictures_in_a_non_empty_output_dir_unless_forced(converted, data_dir, tmp_path,
                                                                                capsys):
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(eval_args(converted, data_dir, "--output-dir", str(out))) == 1
    err = capsys.readouterr().err
    assert f"--output-dir {out} is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(eval_args(converted, data_dir, "--output-dir", str(out), "--force")) == 0
    assert len(list((out / "colour").glob("*.png"))) == 2 and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["colour", "notes.txt"]  # long_range has no benchmark format
    # Again, onto its own earlier output (the colour/ folder now exists): --force still writes there.
    assert main(eval_args(converted, data_dir, "--output-dir", str(out), "--force")) == 0
    assert len(list((out / "colour").glob("*.png"))) == 2


def test_eval_refuses_a_file_where_its_pictures_folder_goes_before_loading_the_model(converted, tmp_path, capsys):
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "colour").write_text("a file")
    assert main(eval_args(converted, tmp_path / "data", "--output-dir", str(out), "--force")) == 1
    err = capsys.readouterr().err
    assert f"--output-dir {out} holds a file colour where the predictions' folder colour/ goes" in err
    assert not (tmp_path / "data").exists()  # refused before the dataset was generated
