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
from ccnet_jax.models.resize import argmax_resized, resize_bilinear, resize_valid_bilinear
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


@pytest.mark.parametrize("size,valid,band_rows", [((64, 96), (57, 90), 32), ((32, 40), (32, 40), 8),
                                                  ((16, 16), (1, 13), 16), ((8, 8), (5, 1), 4)])
def test_argmax_of_resized_logits_in_bands_is_the_argmax_of_the_whole_resize(size, valid, band_rows):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(11, 13, 5)), jnp.float32)
    ids = np.asarray(argmax_resized(logits, size, jnp.asarray(valid, jnp.int32), band_rows))
    whole = resize_valid_bilinear(logits[None], jnp.asarray([[11, 13]]), size, jnp.asarray([valid]))
    want = np.asarray(jnp.argmax(whole[0], axis=-1))
    np.testing.assert_array_equal(ids[: valid[0], : valid[1]], want[: valid[0], : valid[1]])
    assert not ids[valid[0]:].any() and not ids[:, valid[1]:].any()
    with pytest.raises(ValueError, match="multiple of band_rows"):
        argmax_resized(logits, (size[0] + 1, size[1]), jnp.asarray(valid, jnp.int32), band_rows)


def test_a_resized_photo_gets_its_logits_resized_before_the_argmax(tmp_path):
    # With eval_resize the model sees a smaller image; the classes at the photo's size come from
    # its logits resized bilinearly, as evaluation resizes them onto a label, not from
    # blocks of the small argmax.
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    small_logits = rng.normal(size=(1, 50, 60, 4)).astype(np.float32)

    def segment(params, batch_stats, images):
        assert images.shape == (1, 50, 60, 3)
        return jnp.asarray(small_logits)

    predict_files.predict_files([tmp_path / "photo.png"], tmp_path / "out", segment=segment, maps=None,
                                params=None, batch_stats=None, normalization=NORMALIZATIONS["caffe_bgr"],
                                resize=(60, 60), outputs=predict_files.FileOutputs(colours=palette("cityscapes")[:4]),
                                batch_size=1)
    written = np.asarray(Image.open(tmp_path / "out" / "photo_trainIds.png"))
    whole = resize_valid_bilinear(jnp.asarray(small_logits), jnp.asarray([[50, 60]]), (100, 120),
                                  jnp.asarray([[100, 120]]))
    want = np.asarray(jnp.argmax(whole, axis=-1))[0]
    np.testing.assert_array_equal(written, want)
    blocks = np.asarray(Image.fromarray(small_logits[0].argmax(-1).astype(np.uint8)).resize((120, 100), Image.NEAREST))
    assert (written != blocks).mean() > 0.05
