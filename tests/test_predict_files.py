"""`ccnet predict --images`: your own files, of mixed sizes, with a corrupt one among them."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.converted_checkpoint import build_converted
from ccnet_jax.data import cityscapes
from ccnet_jax.evaluation import predict_files
from ccnet_jax.evaluation.image_files import collect_images, image_size, output_stems
from ccnet_jax.evaluation.writers import palette
from ccnet_jax.models.resize import resize_bilinear
from ccnet_jax.train.inputs import NORMALIZATIONS
from tests.converted_models import converted_tiny_ccnet


@pytest.fixture(scope="module")
def cityscapes_model(tmp_path_factory):
    """A small CCNet with Cityscapes' 19 classes, converted from PyTorch-named weights."""
    return converted_tiny_ccnet(tmp_path_factory.mktemp("model"), num_classes=19, seed=3)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    pictures = {"street.png": (41, 57), "road.jpg": (41, 57), "more/tall.png": (63, 30)}
    for name, (h, w) in pictures.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a png")
    return folder, pictures


def expected_ids(model, path) -> np.ndarray:
    """The model's whole-image prediction at the file's size, computed here directly."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    x = jnp.asarray(NORMALIZATIONS["caffe_bgr"](rgb))[None]
    logits = resize_bilinear(model(x)[0], rgb.shape[:2])
    return np.asarray(jnp.argmax(logits, axis=-1))[0]


def test_a_folder_of_mixed_sizes_with_a_corrupt_file(cityscapes_model, images, tmp_path, capsys, monkeypatch):
    folder, pictures = images
    out = tmp_path / "out"
    headers_read = []

    def counted_image_size(path):
        headers_read.append(path.name)
        return image_size(path)

    monkeypatch.setattr(predict_files, "image_size", counted_image_size)
    code = cli_main(["predict", "--checkpoint", str(cityscapes_model), "--images", str(folder),
                     "--output-dir", str(out), "--attention", "20,10", "--batch-size", "2"])
    err = capsys.readouterr().err
    # The corrupt file is named and skipped, the run says so in its exit status, the rest is written.
    assert code == 1 and err.count("broken.png: not a readable image") == 1
    # Each header is read once: the check before loading the model hands its sizes on.
    assert sorted(headers_read) == sorted(["broken.png", *(name.split("/")[-1] for name in pictures)])
    assert "predict 3/3 images" in err and "ETA" in err
    model = build_converted(cityscapes_model)
    model.eval()
    for name, (h, w) in pictures.items():
        stem = name.split("/")[-1].rsplit(".", 1)[0]
        for kind in ("colour", "overlay", "labelIds", "attention"):
            assert (out / f"{stem}_{kind}.png").is_file(), (stem, kind)
        colour = np.asarray(Image.open(out / f"{stem}_colour.png"))
        label_ids = np.asarray(Image.open(out / f"{stem}_labelIds.png"))
        assert colour.shape == (h, w, 3) and label_ids.shape == (h, w)
        ids = expected_ids(model, folder / name)
        np.testing.assert_array_equal(colour, palette("cityscapes")[ids])
        np.testing.assert_array_equal(label_ids, cityscapes.train_ids_to_label_ids(ids.astype(np.uint8)))


def test_globs_and_missing_paths(cityscapes_model, images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "out"
    code = cli_main(["predict", "--checkpoint", str(cityscapes_model), "--images", str(folder / "*.jpg"),
                     str(folder / "nothing-*.png"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "nothing-*.png: no file matches this pattern" in err
    assert sorted(p.name for p in out.iterdir()) == ["road_colour.png", "road_labelIds.png", "road_overlay.png"]
    assert cli_main(["predict", "--checkpoint", str(cityscapes_model), "--images", str(tmp_path / "absent"),
                     "--output-dir", str(out)]) == 1
    assert "no image files to segment" in capsys.readouterr().err


def test_converted_model_of_another_class_count_writes_train_ids(tmp_path, capsys):
    model = converted_tiny_ccnet(tmp_path / "m", seed=4)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "one.png")
    assert cli_main(["predict", "--checkpoint", str(model), "--images", str(tmp_path / "one.png"),
                     "--output-dir", str(tmp_path / "out")]) == 0
    ids = np.asarray(Image.open(tmp_path / "out" / "one_trainIds.png"))
    assert ids.shape == (20, 24) and ids.max() < ref.TINY_CLASSES


def test_collect_images_and_output_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / folder / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    files, problems = collect_images([str(tmp_path / "a"), str(tmp_path / "b" / "x.png"), str(tmp_path / "a")])
    assert [p.parent.name for p in files] == ["a", "b"] and problems == []
    assert output_stems(files) == ["x", "x_2"]
    assert output_stems([tmp_path / n for n in ("a.png", "a.jpg", "a_2.png")]) == ["a", "a_2", "a_2_2"]
