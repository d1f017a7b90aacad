"""What users do with their downloads and the pipeline: re-made zips, damaged archives, macOS and
upper-case file names, paths with spaces, re-runs, unwritable folders, batches that do not fit."""

from __future__ import annotations

import shlex
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from ccnet_jax.data import (
    CorruptImageError,
    DatasetNotPreparedError,
    MissingDownloadError,
    fakes,
    load_split,
    prepare,
)
from ccnet_jax.data.pipeline import PipelineConfig, make_eval_iterator, make_train_iterator
from ccnet_jax.data.transforms import EvalConfig, Normalization, TrainAugmentConfig

ADE_ROOT = "ADEChallengeData2016"


def by_file_name(source) -> dict[str, dict]:
    return {source[i]["file_name"]: source[i] for i in range(len(source))}


def ade_labels(raw: np.ndarray) -> np.ndarray:
    raw = raw.astype(np.int64)
    return np.where((raw >= 1) & (raw <= 150), raw - 1, 255).astype(np.uint8)


def assert_ade_content(data_dir: Path, written: dict) -> None:
    seen = {}
    for split in ("train", "validation"):
        seen.update(by_file_name(load_split("ade20k", split, data_dir)))
    assert set(seen) == set(written)
    for name, example in seen.items():
        np.testing.assert_array_equal(example["image"], written[name]["image"])
        np.testing.assert_array_equal(example["label"], ade_labels(written[name]["raw"]))


def test_zip_remade_with_an_extra_top_folder_is_read(tmp_path):
    # Zipping the extracted folder again (e.g. to move it) nests the tree one folder deeper.
    extracted = tmp_path / "extracted"
    written = fakes.write_ade20k(extracted, as_zip=False)
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "ADEChallengeData2016.zip", "w") as archive:
        for path in sorted(extracted.rglob("*")):
            if path.is_file():
                archive.write(path, "ADEChallengeData2016_copy/" + path.relative_to(extracted).as_posix())
        archive.writestr(f"__MACOSX/ADEChallengeData2016_copy/{ADE_ROOT}/._objectInfo150.txt", b"x")
    prepare("ade20k", tmp_path / "data", manual_dir=manual)
    assert_ade_content(tmp_path / "data", written)


def test_damaged_zip_member_is_named_and_nothing_is_kept(tmp_path):
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual)
    archive = manual / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(archive) as zf:
        member = f"{ADE_ROOT}/images/training/ADE_train_00000002.jpg"
        offset = zf.getinfo(member).header_offset
    data = bytearray(archive.read_bytes())
    data[offset + 200] ^= 0xFF  # inside the stored JPEG: its CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError) as err:
        prepare("ade20k", tmp_path / "data", manual_dir=manual)
    assert member in str(err.value) and str(archive) in str(err.value)
    assert "Download the archive again" in str(err.value)
    with pytest.raises(DatasetNotPreparedError):
        load_split("ade20k", "train", tmp_path / "data")


def test_upper_case_extensions_are_read(tmp_path):
    manual = tmp_path / "manual"
    written = fakes.write_ade20k(manual, as_zip=False)
    for path in sorted((manual / ADE_ROOT).rglob("*")):
        if path.suffix in (".jpg", ".png"):
            path.rename(path.with_suffix(path.suffix.upper()))
    prepare("ade20k", tmp_path / "data", manual_dir=manual)
    seen = {}
    for split in ("train", "validation"):
        seen.update(by_file_name(load_split("ade20k", split, tmp_path / "data")))
    assert set(seen) == {name.replace(".jpg", ".JPG") for name in written}
    for name, example in seen.items():
        np.testing.assert_array_equal(example["label"], ade_labels(written[name.replace(".JPG", ".jpg")]["raw"]))


def test_images_of_the_wrong_format_are_explained(tmp_path):
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual, as_zip=False)
    for path in sorted((manual / ADE_ROOT / "images").rglob("*.jpg")):
        path.rename(path.with_suffix(".png"))
    with pytest.raises(MissingDownloadError, match=r"no \*\.jpg images under .*images/training"):
        prepare("ade20k", tmp_path / "data", manual_dir=manual)


def test_macos_metadata_files_are_skipped(tmp_path):
    manual = tmp_path / "manual"
    written = fakes.write_cityscapes(manual, as_zip=False)
    for image in sorted((manual / "leftImg8bit").rglob("*.png")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    names = set()
    for split in ("train", "validation", "test"):
        names |= set(by_file_name(load_split("cityscapes", split, tmp_path / "data")))
    assert names == set(written)


def test_prepare_again_after_deleting_the_downloads(tmp_path):
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual)
    first = prepare("ade20k", tmp_path / "data", manual_dir=manual)
    (manual / "ADEChallengeData2016.zip").unlink()  # freeing the space once prepared
    assert prepare("ade20k", tmp_path / "data", manual_dir=manual) == first
    assert len(load_split("ade20k", "train", tmp_path / "data")) == 2


def test_path_with_spaces_and_the_command_to_copy(tmp_path):
    data_dir = tmp_path / "my data"
    with pytest.raises(DatasetNotPreparedError) as err:
        load_split("long_range", "train", data_dir, config="tiny")
    command = f"ccnet data prepare long_range --data-dir {shlex.quote(str(data_dir))} --config tiny"
    assert str(err.value).endswith(command)
    assert shlex.split(command)[5] == str(data_dir)  # pasted into a shell, it names the same folder
    manual = tmp_path / "my downloads"
    written = fakes.write_ade20k(manual)
    prepare("ade20k", data_dir, manual_dir=manual)
    assert_ade_content(data_dir, written)


def test_cli_reports_a_data_dir_it_cannot_write(tmp_path, capsys):
    from ccnet_jax import cli

    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    argv = ["data", "prepare", "long_range", "--config", "tiny", "--data-dir", str(blocker / "sub")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err


def test_manual_dir_given_as_the_archive_itself(tmp_path):
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual)
    with pytest.raises(MissingDownloadError) as err:
        prepare("ade20k", tmp_path / "data", manual_dir=manual / "ADEChallengeData2016.zip")
    assert f"is a file: the manual directory must be the folder that holds the downloads, here {manual}." in str(
        err.value
    )



def test_a_manual_dir_that_does_not_exist_is_named_as_such(tmp_path):
    # It read as "2 manual download(s) missing from DIR", as if the folder were there.
    with pytest.raises(MissingDownloadError) as err:
        prepare("cityscapes", tmp_path / "data", manual_dir=tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'} does not exist: create it and put the downloads there" in str(err.value)


def test_a_config_file_that_does_not_exist_lists_the_shipped_ones_wherever_the_command_runs(tmp_path, monkeypatch):
    from ccnet_jax import config as config_lib

    monkeypatch.chdir(tmp_path)  # relative paths from the repository would not hold here
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load("nothing.json")
    root = Path(config_lib.__file__).resolve().parents[1]
    for shipped in (root / "experiments" / "configs" / "cityscapes_r101_769.json",
                    root / "ccnet_jax" / "configs" / "long_range_demo.json"):
        assert str(shipped) in str(err.value) and shipped.is_file()



def test_data_info_on_another_configuration_names_the_one_prepared(tmp_path, capsys):
    # After preparing the tiny long_range, `ccnet data info long_range` only suggested building the default.
    from ccnet_jax import cli

    assert cli.main(["data", "prepare", "long_range", "--config", "tiny", "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["data", "info", "long_range", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not prepared" in err and "Prepared there: configuration 'tiny'" in err
    assert "--config tiny" in err and "--set data.builder_config=tiny" in err


IDENTITY = Normalization("rgb", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_batch_that_does_not_divide_the_mesh_is_refused_up_front():
    assert jax.device_count() == 4  # tests/conftest.py
    source = [{"image": np.zeros((4, 4, 3), np.uint8), "label": np.zeros((4, 4), np.uint8), "file_name": "x"}] * 8
    mesh = jax.make_mesh((4,), ("data",))
    config = PipelineConfig(global_batch_size=2)
    augment = TrainAugmentConfig(crop_size=(4, 4), scales=(1.0,), normalization=IDENTITY)
    with pytest.raises(ValueError, match="global_batch_size 2 must be a multiple of the 4 devices"):
        make_train_iterator(source, config, augment, mesh=mesh)
    with pytest.raises(ValueError, match="multiple of the 4 devices along the mesh's data axis 'data'"):
        make_eval_iterator(source, config, EvalConfig(normalization=IDENTITY), mesh=mesh)
