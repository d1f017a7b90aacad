"""A user's own images: phone photos, 16-bit scans, clashing names, reruns, window settings."""

import numpy as np
import pytest
from PIL import Image

from ccnet_jax import exported_loader
from ccnet_jax.cli import main as cli_main
from ccnet_jax.evaluation.image_files import collect_images, image_size, output_stems, read_rgb
from ccnet_jax.evaluation.inference import InferenceConfig
from ccnet_jax.evaluation.predict_files import is_output
from tests.converted_models import converted_tiny_ccnet

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return converted_tiny_ccnet(tmp_path_factory.mktemp("model"), seed=5)


def save_rotated(path, stored: np.ndarray, orientation: int = 6) -> None:
    """Saves `stored` pixels tagged with an EXIF orientation (6: viewers turn it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(stored).save(path, exif=exif if path.suffix == ".tif" else exif.tobytes())


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_a_photo_is_read_upright_as_viewers_show_it(tmp_path, suffix):
    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = tmp_path / f"phone{suffix}"
    save_rotated(path, stored)
    rgb = read_rgb(path)
    # The header's size agrees with the pixels (Pillow turns a TIFF itself; it must not be turned twice).
    assert rgb.shape == (10, 6, 3) and image_size(path) == (10, 6)
    if suffix != ".jpg":
        np.testing.assert_array_equal(rgb, np.rot90(stored, k=-1))
    np.testing.assert_array_equal(exported_loader.read_rgb(path), rgb)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.arange(0, 240, dtype=np.uint16).reshape(12, 20)
    Image.fromarray(grey * 257).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")
    rgb = read_rgb(tmp_path / "scan.png")
    np.testing.assert_array_equal(rgb, np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1))
    np.testing.assert_array_equal(exported_loader.read_rgb(tmp_path / "scan.png"), rgb)


@pytest.mark.parametrize("mode", ["F", "F;0-255"])
def test_float_grey_tiffs_are_read_as_zero_to_one_or_as_bytes(tmp_path, mode):
    # convert("RGB") takes float pixels as 0-255: a 0-1 picture came out nearly black.
    grey = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    values = grey.astype(np.float32) / (255.0 if mode == "F" else 1.0)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    want = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(read_rgb(tmp_path / "float.tif"), want)
    np.testing.assert_array_equal(exported_loader.read_rgb(tmp_path / "float.tif"), want)


class CountingExport:
    """Stands in for a fixed-batch export: class id = red channel // 64 of the fitted canvas."""

    def __init__(self):
        self.batches = []

    def call(self, images):
        self.batches.append(images.shape)
        ids = (images[..., 0] // 64).astype(np.int32)
        return ids, np.eye(4, dtype=np.float32)[ids]  # logits: one score per class


def test_a_fixed_batch_export_segments_that_many_images_per_call(tmp_path, monkeypatch):
    # Each call segmented one image copied into every slot of the batch: N times the work.
    info = {"height": 16, "width": 16, "batch": 2, "pad_rgb": [0, 0, 0], "colours": [[0, 0, 0]] * 4,
            "platforms": ["cpu", "cuda", "tpu"]}
    rng = np.random.default_rng(4)
    sizes = {"a.png": (16, 16), "b.png": (8, 16), "c.png": (16, 4)}
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    export = CountingExport()
    monkeypatch.setattr(exported_loader, "load", lambda folder: (export, info))
    out = tmp_path / "out"
    assert exported_loader.main(["--images", *(str(tmp_path / n) for n in sizes), "--output-dir", str(out)]) == 0
    assert export.batches == [(2, 16, 16, 3), (2, 16, 16, 3)]
    single = CountingExport()
    for name, size in sizes.items():
        ids = np.asarray(Image.open(out / f"{name[0]}_trainIds.png"))
        alone = exported_loader.segment(single, info, read_rgb(tmp_path / name))
        assert ids.shape == size and ids.max() > 0
        np.testing.assert_array_equal(ids, alone)


def test_the_shipped_loader_names_an_export_for_another_platform(tmp_path, monkeypatch, capsys):
    # A --platform cuda export run on a CPU ended in jax's traceback about lowering platforms.
    import jax

    other = "cuda" if jax.default_backend() == "cpu" else "cpu"
    info = {"height": 16, "width": 16, "batch": 1, "pad_rgb": [0, 0, 0], "colours": [[0, 0, 0]], "platforms": [other]}
    export = CountingExport()
    monkeypatch.setattr(exported_loader, "load", lambda folder: (export, info))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit):
        exported_loader.main(["--images", str(tmp_path / "a.png"), "--output-dir", str(tmp_path / "out"),
                              "--model-dir", str(tmp_path)])
    assert f"{tmp_path} was exported for {other} and jax here runs on" in capsys.readouterr().err
    assert export.batches == [] and not (tmp_path / "out").exists()


def test_names_differing_only_in_case_do_not_share_an_output(tmp_path):
    # On macOS and Windows Photo_colour.png and photo_colour.png are one file.
    assert output_stems([tmp_path / "a" / "Photo.png", tmp_path / "b" / "photo.jpg"]) == ["Photo", "photo_2"]


def test_a_previous_runs_pictures_among_the_inputs_are_not_segmented(tmp_path):
    photos = tmp_path / "photos"
    (photos / "out").mkdir(parents=True)
    for name in ("street.png", "out/street_colour.png", "out/street_trainIds.png", "street_overlay.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photos / name)
    files, _ = collect_images([str(photos)], exclude=lambda p: is_output(p, photos / "out"))
    assert [p.relative_to(photos.resolve()).as_posix() for p in files] == ["street.png", "street_overlay.png"]
    # Writing into the photos' own folder: its pictures are left out, the photos are not.
    files, _ = collect_images([str(photos / "*.png")], exclude=lambda p: is_output(p, photos))
    assert [p.name for p in files] == ["street.png"]
    # A file named on the command line is taken whatever it is called.
    named = str(photos / "out" / "street_colour.png")
    assert len(collect_images([named], exclude=lambda p: is_output(p, photos / "out"))[0]) == 1


def test_predict_writes_rotated_photos_upright_notes_renames_and_reruns_only_with_force(tiny_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    rng = np.random.default_rng(1)
    save_rotated(photos / "a" / "photo.png", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(photos / "b" / "photo.png")
    out = photos / "segmented"
    command = ["predict", "--checkpoint", str(tiny_model), "--images", str(photos), "--output-dir", str(out)]
    assert cli_main(command) == 0
    err = capsys.readouterr().err
    assert f"{photos / 'b' / 'photo.png'}: written as photo_2_*" in err
    for name in ("photo", "photo_2"):
        for kind in ("colour", "overlay", "trainIds"):
            assert Image.open(out / f"{name}_{kind}.png").size == (12, 20), (name, kind)
    overlay = np.asarray(Image.open(out / "photo_overlay.png")).astype(int)
    upright = read_rgb(photos / "a" / "photo.png").astype(int)
    colour = np.asarray(Image.open(out / "photo_colour.png")).astype(int)
    assert np.abs(overlay - (upright + colour) / 2).max() <= 1
    written = sorted(p.name for p in out.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # A rerun would replace the pictures: refused, naming them, before the model loads; --force reruns.
    assert cli_main(command) == 1
    assert "6 picture(s) in --output-dir" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert cli_main([*command, "--force"]) == 0
    assert "2 images" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == written


def test_the_shipped_loader_keeps_names_differing_in_case_apart(tiny_model, tmp_path):
    model = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(tiny_model), "--output", str(model), "--height", "16",
                     "--width", "16"]) == 0
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "Photo.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b" / "photo.png")
    out = tmp_path / "out"
    assert exported_loader.main(["--images", str(tmp_path / "a" / "Photo.png"), str(tmp_path / "b" / "photo.png"),
                                 "--output-dir", str(out), "--model-dir", str(model)]) == 0
    assert {p.name for p in out.iterdir()} == {"Photo_trainIds.png", "Photo_colour.png", "photo_2_trainIds.png",
                                               "photo_2_colour.png"}


def test_sliding_windows_further_apart_than_wide_are_refused():
    # Such windows leave pixels no window covers, whose logits were 0/0 (NaN) and whose class came out 0.
    with pytest.raises(ValueError, match=r"eval.stride \[30, 16\] must not exceed eval.crop_size \[16, 16\]"):
        InferenceConfig(mode="sliding", crop_size=(16, 16), stride=(30, 16))
    InferenceConfig(mode="sliding", crop_size=(16, 16), stride=(16, 16))
    InferenceConfig(mode="whole", crop_size=(16, 16), stride=(30, 30))  # no windows, nothing to refuse
