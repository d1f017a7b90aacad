"""TFDS builders on tiny archives in the real layout: content, label mapping, errors, interruption."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ccnet_jax.data import (
    CorruptImageError,
    DatasetNotPreparedError,
    MissingDownloadError,
    ade20k,
    cityscapes,
    fakes,
    load_split,
    long_range,
    prepare,
    sources,
)
from ccnet_jax.data.common import incomplete_leftovers

# The official Cityscapes labelId -> trainId pairs (cityscapesScripts labels.py); all else is 255.
OFFICIAL_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def by_file_name(source) -> dict[str, dict]:
    return {source[i]["file_name"]: source[i] for i in range(len(source))}


def test_cityscapes_table_maps_every_label_id():
    for label_id in range(256):
        expected = OFFICIAL_TRAIN_IDS.get(label_id, 255)
        assert cityscapes.LABEL_ID_TO_TRAIN_ID[label_id] == expected, label_id
    assert cityscapes.CLASS_NAMES[0] == "road" and cityscapes.CLASS_NAMES[18] == "bicycle"
    assert cityscapes.PALETTE.shape == (19, 3)
    assert tuple(cityscapes.PALETTE[13]) == (0, 0, 142)  # car
    # Predictions go back to labelIds for the test server.
    for label_id, train_id in OFFICIAL_TRAIN_IDS.items():
        assert cityscapes.TRAIN_ID_TO_LABEL_ID[train_id] == label_id


@pytest.mark.parametrize("as_zip", [True, False], ids=["zips", "folders"])
def test_cityscapes_builder(tmp_path, as_zip):
    manual = tmp_path / "manual"
    written = fakes.write_cityscapes(manual, counts={"train": 3, "val": 1, "test": 1}, as_zip=as_zip)
    # One label holds every value 0..255, so the stored mapping is checked for every labelId.
    every_value = next(k for k in written if k.startswith("train/"))
    written[every_value]["label_ids"][:] = np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(2, axis=1)
    _rewrite_label(manual, every_value, written[every_value]["label_ids"], as_zip)

    prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    seen = {}
    for split, folder in (("train", "train"), ("validation", "val"), ("test", "test")):
        examples = by_file_name(load_split("cityscapes", split, tmp_path / "data"))
        assert all(name.startswith(f"{folder}/") for name in examples)
        seen.update(examples)
    assert set(seen) == set(written)
    for name, example in seen.items():
        assert example["image"].dtype == np.uint8 and example["image"].shape == (16, 32, 3)
        assert example["label"].dtype == np.uint8 and example["label"].shape == (16, 32)
        np.testing.assert_array_equal(example["image"], written[name]["image"])
        expected = np.vectorize(lambda v: OFFICIAL_TRAIN_IDS.get(int(v), 255))(written[name]["label_ids"])
        np.testing.assert_array_equal(example["label"], expected.astype(np.uint8))


def _rewrite_label(manual: Path, image_path: str, label_ids: np.ndarray, as_zip: bool) -> None:
    from PIL import Image

    folder, city, name = image_path.split("/")
    relative = f"gtFine/{folder}/{city}/{name.replace('_leftImg8bit.png', '_gtFine_labelIds.png')}"
    buffer = io.BytesIO()
    Image.fromarray(label_ids).save(buffer, format="PNG")
    if as_zip:
        archive = manual / "gtFine_trainvaltest.zip"
        with zipfile.ZipFile(archive) as old:
            members = {n: old.read(n) for n in old.namelist()}
        members[relative] = buffer.getvalue()
        with zipfile.ZipFile(archive, "w") as new:
            for member, data in members.items():
                new.writestr(member, data)
    else:
        (manual / relative).write_bytes(buffer.getvalue())


def test_cityscapes_missing_downloads_are_named(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(MissingDownloadError) as err:
        prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    message = str(err.value)
    for text in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip",
                 "https://www.cityscapes-dataset.com/downloads/", str(manual)):
        assert text in message
    # With the images present, only the labels are asked for.
    fakes.write_cityscapes(manual)
    (manual / "gtFine_trainvaltest.zip").unlink()
    with pytest.raises(MissingDownloadError) as err:
        prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    assert "gtFine_trainvaltest.zip" in str(err.value)
    assert "leftImg8bit_trainvaltest.zip" not in str(err.value)
    assert not sources.is_prepared("cityscapes", tmp_path / "data")


def test_corrupt_image_names_the_file_and_nothing_is_kept(tmp_path):
    manual = tmp_path / "manual"
    written = fakes.write_cityscapes(manual, as_zip=False)
    victim = sorted(written)[-1]
    path = manual / "leftImg8bit" / victim
    path.write_bytes(path.read_bytes()[:60])  # a truncated download
    with pytest.raises(CorruptImageError) as err:
        prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    assert str(path) in str(err.value)
    with pytest.raises(DatasetNotPreparedError):
        load_split("cityscapes", "train", tmp_path / "data")


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_ade20k_builder(tmp_path, as_zip):
    manual = tmp_path / "manual"
    written = fakes.write_ade20k(manual, as_zip=as_zip)
    prepare("ade20k", tmp_path / "data", manual_dir=manual)
    seen = {}
    for split in ("train", "validation"):
        seen.update(by_file_name(load_split("ade20k", split, tmp_path / "data")))
    assert set(seen) == set(written)
    for name, example in seen.items():
        raw = written[name]["raw"].astype(np.int64)
        expected = np.where((raw >= 1) & (raw <= 150), raw - 1, 255).astype(np.uint8)
        np.testing.assert_array_equal(example["label"], expected)
        # The grayscale JPEG comes back as 3-channel RGB, pixel for pixel.
        assert example["image"].shape == written[name]["image"].shape
        np.testing.assert_array_equal(example["image"], written[name]["image"])
    assert len(ade20k.CLASS_NAMES) == 150
    with pytest.raises(ValueError, match="no split 'test'"):
        load_split("ade20k", "test", tmp_path / "data")


def test_ade20k_label_mapping_every_value():
    for raw in range(256):
        expected = raw - 1 if 1 <= raw <= 150 else 255
        assert ade20k.RAW_TO_TRAIN_ID[raw] == expected


def test_ade20k_missing_download_is_named(tmp_path):
    manual = tmp_path / "nothing_here"
    manual.mkdir()
    with pytest.raises(MissingDownloadError) as err:
        prepare("ade20k", tmp_path / "data", manual_dir=manual)
    message = str(err.value)
    assert "ADEChallengeData2016.zip" in message
    assert "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip" in message
    assert str(manual) in message


def test_cityscapes_labels_without_their_images_are_a_missing_download(tmp_path):
    # An interrupted unzip of leftImg8bit: 4 of 5 train images gone, their labels (and the archive's
    # _color, _instanceIds and _polygons.json files beside them) still there.
    manual = tmp_path / "manual"
    written = fakes.write_cityscapes(manual, counts={"train": 5, "val": 1, "test": 1}, as_zip=False)
    lost = sorted(name for name in written if name.startswith("train/"))[1:]
    for name in lost:
        (manual / "leftImg8bit" / name).unlink()
    with pytest.raises(MissingDownloadError) as err:
        prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    message = str(err.value)
    assert f"cityscapes: 4 label(s) have no image under {manual / 'leftImg8bit' / 'train'}: " in message
    first = lost[0].replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    assert str(manual / "gtFine" / first) in message and "and 1 more" in message
    assert "_color" not in message and "_instanceIds" not in message and "polygons" not in message
    assert "leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ is incomplete" in message
    assert not sources.is_prepared("cityscapes", tmp_path / "data")


def test_cityscapes_test_labels_are_checked_only_where_the_test_folder_has_them(tmp_path):
    manual = tmp_path / "manual"
    written = fakes.write_cityscapes(manual, counts={"train": 1, "val": 1, "test": 2}, as_zip=False)
    test_image = next(name for name in sorted(written) if name.startswith("test/"))
    (manual / "leftImg8bit" / test_image).unlink()
    with pytest.raises(MissingDownloadError, match=r"1 label\(s\) have no image under .*leftImg8bit/test: "):
        prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    # A test folder without labels (they are withheld) is prepared as before: every pixel ignored.
    for label in (manual / "gtFine" / "test").rglob("*"):
        if label.is_file():
            label.unlink()
    prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    test = load_split("cityscapes", "test", tmp_path / "data")
    assert len(test) == 1 and np.all(test[0]["label"] == 255)


def test_ade20k_annotations_without_their_images_are_a_missing_download(tmp_path):
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual, counts={"training": 1, "validation": 2}, as_zip=False)
    (manual / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000002.jpg").unlink()
    with pytest.raises(MissingDownloadError) as err:
        prepare("ade20k", tmp_path / "data", manual_dir=manual)
    message = str(err.value)
    assert "ade20k: 1 label(s) have no image under " in message
    assert str(manual / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png") in message
    assert "ADEChallengeData2016.zip from http://data.csail.mit.edu/" in message and "Download it again" in message


def warning_lines(err: str, dataset: str) -> list[str]:
    """The builder's warnings, each from where it starts (tfds' progress bars share the lines' start)."""
    start = f"warning: {dataset} "
    return [line[line.index(start):] for line in err.splitlines() if start in line]


def test_splits_of_another_size_than_the_official_archive_are_warned_about(tmp_path, capfd):
    manual = tmp_path / "manual"
    fakes.write_cityscapes(manual, counts={"train": 3, "val": 1, "test": 1})
    prepare("cityscapes", tmp_path / "data", manual_dir=manual)
    warnings = warning_lines(capfd.readouterr().err, "cityscapes")
    assert sorted(warnings) == sorted(
        f"warning: cityscapes split {split!r} has {found} examples, the official archive {official}; a partly "
        "extracted or partly copied download is the usual cause (a deliberate subset is fine)"
        for split, found, official in (("train", 3, 2975), ("validation", 1, 500), ("test", 1, 1525)))


def test_splits_of_the_official_size_are_not_warned_about(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(ade20k, "OFFICIAL_COUNTS", {"train": 2, "validation": 1})
    manual = tmp_path / "manual"
    fakes.write_ade20k(manual, counts={"training": 2, "validation": 1})
    prepare("ade20k", tmp_path / "data", manual_dir=manual)
    assert warning_lines(capfd.readouterr().err, "ade20k") == []
    monkeypatch.setattr(ade20k, "OFFICIAL_COUNTS", {"train": 20210, "validation": 1})
    prepare("ade20k", tmp_path / "other", manual_dir=manual)
    warnings = warning_lines(capfd.readouterr().err, "ade20k")
    assert warnings == ["warning: ade20k split 'train' has 2 examples, the official archive 20210; a partly "
                        "extracted or partly copied download is the usual cause (a deliberate subset is fine)"]


@pytest.mark.parametrize("dataset, extracted", [("ade20k", "ADEChallengeData2016"), ("cityscapes", "leftImg8bit")])
def test_the_extracted_folder_given_as_manual_dir_is_told_to_pass_its_parent(dataset, extracted, tmp_path):
    downloads = tmp_path / "downloads"
    (fakes.write_ade20k if dataset == "ade20k" else fakes.write_cityscapes)(downloads, as_zip=False)
    with pytest.raises(MissingDownloadError) as err:
        prepare(dataset, tmp_path / "data", manual_dir=downloads / extracted)
    assert (f"{downloads / extracted} is the extracted folder '{extracted}/' itself: pass the folder that holds it, "
            f"--manual-dir {downloads}.") in str(err.value)
    prepare(dataset, tmp_path / "data", manual_dir=downloads)  # which is accepted


def test_long_range_builds_and_is_deterministic(tmp_path):
    prepare("long_range", tmp_path / "data", config="tiny")
    train = load_split("long_range", "train", tmp_path / "data", config="tiny")
    assert len(train) == 64
    assert len(load_split("long_range", "validation", tmp_path / "data", config="tiny")) == 16
    assert len(load_split("long_range", "test", tmp_path / "data", config="tiny")) == 16
    for name, example in list(by_file_name(train).items())[:5]:
        index = int(name.split("/")[1].split(".")[0])
        image, label = long_range.render_example(long_range.example_rng(0, "train", index))
        np.testing.assert_array_equal(example["image"], image)
        np.testing.assert_array_equal(example["label"], label)
    a, _ = long_range.render_example(long_range.example_rng(0, "train", 3))
    b, _ = long_range.render_example(long_range.example_rng(0, "validation", 3))
    c, _ = long_range.render_example(long_range.example_rng(1, "train", 3))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def _layouts(spec: long_range.RenderSpec, seed: int, count: int):
    """(index, layout) of the first `count` train examples, placed as render_example places them."""
    for index in range(count):
        rng = long_range.example_rng(seed, "train", index)
        layout = None
        while layout is None:
            layout = long_range._place_layout(rng, spec)
        yield index, layout


def test_long_range_reach_rules():
    spec = long_range.RenderSpec()
    classes_seen = set()
    for index, layout in _layouts(spec, 7, 40):
        key = layout.key
        for block in layout.blocks:
            # One step (same row or column) never reaches the key ...
            assert not key.rows_meet(block) and not key.cols_meet(block)
        for bar, marker, horizontal, _ in layout.bars:
            # ... while a bar's marker is on the bar's axis, just past one end,
            if horizontal:
                assert marker.r0 <= bar.r0 and bar.r1 <= marker.r1
                assert marker.c1 + spec.marker_gap == bar.c0 or bar.c1 + spec.marker_gap == marker.c0
            else:
                assert marker.c0 <= bar.c0 and bar.c1 <= marker.c1
                assert marker.r1 + spec.marker_gap == bar.r0 or bar.r1 + spec.marker_gap == marker.r0
            # and no other marker (nor the key) lies on the bar's band.
            others = [m for b, m, _, _ in layout.bars if b is not bar] + [key]
            for other in others:
                assert not (bar.rows_meet(other) if horizontal else bar.cols_meet(other))
        image, label = long_range.render_example(long_range.example_rng(7, "train", index), spec)
        classes_seen |= set(np.unique(label).tolist())
        for block in layout.blocks:
            patch = label[block.r0 : block.r1, block.c0 : block.c1]
            assert np.all(patch == long_range.TWO_STEP_CLASSES[layout.key_color])
        for bar, marker, _, color in layout.bars:
            assert np.all(label[bar.r0 : bar.r1, bar.c0 : bar.c1] == long_range.ONE_STEP_CLASSES[color])
            np.testing.assert_array_equal(
                image[marker.r0 : marker.r1, marker.c0 : marker.c1],
                np.broadcast_to(long_range.MARKER_COLORS[color], (spec.marker_size, spec.marker_size, 3)),
            )
            # A marker is labelled by its own colour: a local cue.
            assert np.all(label[marker.r0 : marker.r1, marker.c0 : marker.c1] == long_range.LOCAL_CLASSES[color])
        ring = label[key.r0 : key.r1, key.c0 : key.c1]
        border = spec.key_border
        assert np.all(ring[:border] == long_range.LOCAL_CLASSES[layout.key_color])
        assert np.all(ring[-border:] == long_range.LOCAL_CLASSES[layout.key_color])
        assert not np.isin(ring[border:-border, border:-border], long_range.LOCAL_CLASSES).any()
        # Clutter never reaches a marker colour's bright channel.
        assert _only_markers_bright(image, label == 0)
    assert classes_seen == set(range(long_range.NUM_CLASSES))
    groups = [set(long_range.ONE_STEP_CLASSES), set(long_range.TWO_STEP_CLASSES), set(long_range.LOCAL_CLASSES)]
    assert set.union(*groups) | {0} == set(range(long_range.NUM_CLASSES))
    assert sum(len(g) for g in groups) + 1 == long_range.NUM_CLASSES
    assert long_range.PALETTE.shape == (long_range.NUM_CLASSES, 3)


def test_far_key_keeps_its_distance_from_the_blocks():
    for _, layout in _layouts(long_range.RenderSpec(key_gap=24), 3, 20):
        key = layout.key
        for block in layout.blocks:
            row_gap = max(block.r0 - key.r1, key.r0 - block.r1)
            col_gap = max(block.c0 - key.c1, key.c0 - block.c1)
            assert row_gap >= 24 and col_gap >= 24


def _only_markers_bright(image: np.ndarray, background: np.ndarray) -> bool:
    bright = background & (image.max(axis=-1) > 156)
    colours = {tuple(c) for c in image[bright]}
    return colours <= {tuple(c) for c in long_range.MARKER_COLORS}


def test_interrupted_preparation_is_never_complete(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = long_range.render_example

    def failing(rng, spec=long_range.RenderSpec()):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("injected failure")
        return real(rng, spec)

    monkeypatch.setattr(long_range, "render_example", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        prepare("long_range", tmp_path / "data", config="tiny")
    assert not sources.is_prepared("long_range", tmp_path / "data", config="tiny")
    assert not sources.prepared_dir("long_range", tmp_path / "data", "tiny").exists()
    with pytest.raises(DatasetNotPreparedError, match="ccnet data prepare long_range"):
        load_split("long_range", "train", tmp_path / "data", config="tiny")
    monkeypatch.setattr(long_range, "render_example", real)
    prepare("long_range", tmp_path / "data", config="tiny")
    assert len(load_split("long_range", "train", tmp_path / "data", config="tiny")) == 64


def test_killed_preparation_is_never_complete(tmp_path):
    # A hard kill skips every cleanup handler: the temporary folder stays behind.
    script = textwrap.dedent(
        f"""
        import os
        from ccnet_jax.data import long_range, prepare
        real = long_range.render_example
        calls = [0]
        def dying(rng, spec=long_range.RenderSpec()):
            calls[0] += 1
            if calls[0] == 70:
                os._exit(9)
            return real(rng, spec)
        long_range.render_example = dying
        prepare("long_range", {str(tmp_path / "data")!r}, config="tiny")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 9, result.stderr.decode()[-2000:]
    target = sources.prepared_dir("long_range", tmp_path / "data", "tiny")
    assert incomplete_leftovers(target), "the killed run should have left its temporary folder"
    assert not sources.is_prepared("long_range", tmp_path / "data", config="tiny")
    with pytest.raises(DatasetNotPreparedError, match="interrupted"):
        load_split("long_range", "validation", tmp_path / "data", config="tiny")
    prepare("long_range", tmp_path / "data", config="tiny")
    assert len(load_split("long_range", "validation", tmp_path / "data", config="tiny")) == 16


def test_unknown_names_are_explained(tmp_path):
    with pytest.raises(ValueError, match="cityscapes, ade20k, long_range"):
        load_split("pascal", "train", tmp_path)
    with pytest.raises(ValueError, match="available: default, tiny"):
        load_split("long_range", "train", tmp_path, config="huge")
    with pytest.raises(ValueError, match="no split 'val'"):
        load_split("long_range", "val", tmp_path)


def test_cli_prepare_and_info(tmp_path, capsys):
    from ccnet_jax import cli

    data_dir = str(tmp_path / "data")
    assert cli.main(["data", "prepare", "long_range", "--data-dir", data_dir, "--config", "tiny"]) == 0
    assert "long_range/train: 64 examples" in capsys.readouterr().out
    assert cli.main(["data", "prepare", "long_range", "--data-dir", data_dir, "--config", "tiny"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert cli.main(["data", "prepare", "cityscapes", "--data-dir", data_dir]) == 1
    err = capsys.readouterr().err
    assert "leftImg8bit_trainvaltest.zip" in err and str(Path(data_dir) / "downloads" / "manual") in err
    manual = tmp_path / "elsewhere"
    fakes.write_ade20k(manual)
    assert cli.main(["data", "prepare", "ade20k", "--data-dir", data_dir, "--manual-dir", str(manual)]) == 0
    assert "ade20k/validation: 1 examples" in capsys.readouterr().out
    assert cli.main(["data", "info", "cityscapes", "--data-dir", data_dir]) == 1
    assert "ccnet data prepare cityscapes" in capsys.readouterr().err
