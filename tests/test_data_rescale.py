"""Images are rescaled as the authors' cv2.resize(..., INTER_LINEAR) does, in training and in
evaluation: two taps per axis at half-pixel centres, the edge pixel repeated outside, and no
antialiasing filter when shrinking (the training scales 0.7, 0.8 and 0.9 shrink; PIL's bilinear
blurred them).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ccnet_jax.data.transforms import CAFFE_BGR, EvalConfig, EvalTransform, TrainAugmentConfig, TrainTransform
from ccnet_jax.evaluation.predict_files import FileOutputs, predict_files


def linear_taps(in_size: int, out_size: int, factor: float | None = None) -> np.ndarray:
    """(out_size, in_size) weights of OpenCV's INTER_LINEAR along one axis, in float64.

    Output pixel d samples source position (d + 0.5) * in / out - 0.5, or with `factor` (cv2.resize
    given fx and fy, the output size rounded) (d + 0.5) / factor - 0.5; a position before the
    first pixel centre, or at or past the last one, takes the edge pixel alone.
    """
    weights = np.zeros((out_size, in_size))
    step = in_size / out_size if factor is None else 1.0 / factor
    for d in range(out_size):
        position = (d + 0.5) * step - 0.5
        low = int(np.floor(position))
        frac = position - low
        if low < 0:
            low, frac = 0, 0.0
        if low >= in_size - 1:
            low, frac = in_size - 1, 0.0
        weights[d, low] += 1.0 - frac
        weights[d, min(low + 1, in_size - 1)] += frac
    return weights


def opencv_linear(image: np.ndarray, size: tuple[int, int], factor: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3) resized to `size` (from `factor`, if given) with INTER_LINEAR semantics,
    float64 (not rounded)."""
    rows = linear_taps(image.shape[0], size[0], factor)
    cols = linear_taps(image.shape[1], size[1], factor)
    return np.einsum("oh,hwc,pw->opc", rows, image.astype(np.float64), cols, optimize=True)


def noise_image(seed: int, shape=(60, 80, 3)) -> np.ndarray:
    # Pixel-level detail: what an antialiasing filter would smooth away.
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("scale", [0.7, 0.8, 0.9, 1.5, 2.1])
@pytest.mark.parametrize("shape", [(60, 80, 3), (61, 83, 3)], ids=["whole_sizes", "rounded_sizes"])
def test_training_rescale_is_opencv_bilinear_without_antialiasing(scale, shape):
    # The authors' cv2.resize(image, None, fx=scale, fy=scale) rounds the size and samples every
    # 1/scale source pixels: at 61x83 and 0.7 the size is 43x58, where 61/43 would be off by 0.4 of
    # a pixel at the far edge (and most of a grey level range on this noise).
    image = noise_image(1, shape)
    height, width = image.shape[:2]
    new_h, new_w = int(round(height * scale)), int(round(width * scale))
    # A crop larger than the rescaled image: the output holds all of it (padding after), unflipped.
    config = TrainAugmentConfig(crop_size=(200, 200), scales=(scale,), flip_prob=0.0)
    out = TrainTransform(config).random_map(
        {"image": image, "label": np.zeros((height, width), np.uint8)}, np.random.default_rng(0))
    rgb = CAFFE_BGR.invert(out["image"][:new_h, :new_w])
    want = opencv_linear(image, (new_h, new_w), scale)
    # cv2 rounds its fixed-point result to a grey level: within one of the exact value.
    assert np.abs(rgb - want).max() <= 1.0 + 1e-3
    assert np.all(out["label"][:new_h, :new_w] == 0) and np.all(out["label"][new_h:] == 255)


@pytest.mark.parametrize("scale", [0.7, 1.5])
def test_training_labels_take_the_pixel_under_each_sample_centre(scale):
    # Each label pixel is the source pixel holding the centre of the image's sample there, at the
    # same 1/scale step as the image, up to the last source pixel where a rounded-up size runs past.
    height, width = 61, 83
    label = (np.arange(height)[:, None] * 3 + np.arange(width)[None, :] * 7).astype(np.uint8)
    image = np.zeros((height, width, 3), np.uint8)
    new_h, new_w = int(round(height * scale)), int(round(width * scale))
    config = TrainAugmentConfig(crop_size=(200, 200), scales=(scale,), flip_prob=0.0)
    out = TrainTransform(config).random_map({"image": image, "label": label}, np.random.default_rng(0))
    rows = np.minimum(np.floor((np.arange(new_h) + 0.5) / scale).astype(int), height - 1)
    cols = np.minimum(np.floor((np.arange(new_w) + 0.5) / scale).astype(int), width - 1)
    np.testing.assert_array_equal(out["label"][:new_h, :new_w], label[np.ix_(rows, cols)])


def test_training_crop_window_equals_rescaling_the_whole_image_then_cropping():
    image = noise_image(2, (90, 110, 3))
    config = TrainAugmentConfig(crop_size=(40, 50), scales=(0.7,), flip_prob=0.0)
    new_h, new_w = 63, 77  # round(90 * 0.7), round(110 * 0.7)
    full = opencv_linear(image, (new_h, new_w))
    for seed in range(6):
        rng = np.random.default_rng(seed)
        rng.integers(1)  # the transform's draw of its one scale comes first
        top, left = int(rng.integers(new_h - 40 + 1)), int(rng.integers(new_w - 50 + 1))
        out = TrainTransform(config).random_map(
            {"image": image, "label": np.zeros(image.shape[:2], np.uint8)}, np.random.default_rng(seed))
        rgb = CAFFE_BGR.invert(out["image"])
        assert np.abs(rgb - full[top : top + 40, left : left + 50]).max() <= 1.0 + 1e-3


def test_evaluation_resize_is_opencv_bilinear_without_antialiasing():
    image = noise_image(3, (100, 120, 3))
    out = EvalTransform(EvalConfig(resize=(60, 60))).map(
        {"image": image, "label": np.zeros((100, 120), np.uint8)})
    assert out["image"].shape == (50, 60, 3)
    want = opencv_linear(image, (50, 60))
    assert np.abs(CAFFE_BGR.invert(out["image"]) - want).max() <= 1.0 + 1e-3


def test_predict_on_files_resizes_as_the_evaluation_pipeline(tmp_path):
    # `ccnet predict --images` used PIL's antialiased bilinear where evaluation did not.
    image = noise_image(4, (100, 120, 3))
    Image.fromarray(image).save(tmp_path / "photo.png")
    seen = []

    def segment(params, batch_stats, images):
        seen.append(np.asarray(images))
        return np.zeros((*images.shape[:3], 2), np.float32)

    predict_files([tmp_path / "photo.png"], tmp_path / "out", segment=segment, maps=None, params=None,
                  batch_stats=None, normalization=CAFFE_BGR, resize=(60, 60),
                  outputs=FileOutputs(colours=np.zeros((2, 3), np.uint8)), batch_size=1)
    label = np.zeros((100, 120), np.uint8)
    evaluated = EvalTransform(EvalConfig(resize=(60, 60))).map({"image": image, "label": label})
    assert seen[0].shape == (1, 50, 60, 3)
    np.testing.assert_array_equal(seen[0][0], evaluated["image"])
    assert Image.open(tmp_path / "out" / "photo_trainIds.png").size == (120, 100)
