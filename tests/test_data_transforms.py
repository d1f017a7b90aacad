"""Training/evaluation transforms: image and label stay aligned through every augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ccnet_jax.data.transforms import (
    AUTHORS_SCALES,
    CAFFE_BGR,
    IMAGENET_RGB,
    EvalConfig,
    EvalTransform,
    PhotometricConfig,
    TrainAugmentConfig,
    TrainTransform,
    photometric_distort,
)

H, W = 100, 120
ROWS, COLS = np.mgrid[:H, :W]
# Each pixel holds its own coordinates: R = row, G = column (B constant).
COORD_IMAGE = np.stack([ROWS, COLS, np.full_like(ROWS, 77)], axis=-1).astype(np.uint8)


def run_twice(transform: TrainTransform, seed: int):
    """The same random draws applied with a row-coordinate label and a column-coordinate label."""
    out_rows = transform.random_map({"image": COORD_IMAGE, "label": ROWS.astype(np.uint8)}, np.random.default_rng(seed))
    out_cols = transform.random_map({"image": COORD_IMAGE, "label": COLS.astype(np.uint8)}, np.random.default_rng(seed))
    np.testing.assert_array_equal(out_rows["image"], out_cols["image"])
    return out_rows, out_cols


CONFIGS = {
    "authors_bgr": TrainAugmentConfig(crop_size=(64, 80)),
    "set_rgb_small_scales": TrainAugmentConfig(
        crop_size=(64, 80), scales=(0.5, 0.7, 1.0, 1.3, 2.0), normalization=IMAGENET_RGB
    ),
    "range_crop_larger_than_image": TrainAugmentConfig(
        crop_size=(150, 90), scale_range=(0.5, 2.0), normalization=CAFFE_BGR
    ),
    "base_size": TrainAugmentConfig(crop_size=(48, 48), scale_range=(0.5, 2.0), base_size=(60, 50)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_label_follows_image(name):
    config = CONFIGS[name]
    transform = TrainTransform(config)
    flips = set()
    for seed in range(40):
        out_rows, out_cols = run_twice(transform, seed)
        image, label_r, label_c = out_rows["image"], out_rows["label"], out_cols["label"]
        assert image.shape == config.crop_size + (3,) and image.dtype == np.float32
        assert label_r.shape == config.crop_size and label_r.dtype == np.uint8
        valid = label_r != 255
        np.testing.assert_array_equal(valid, label_c != 255)
        assert valid.any()
        # Padding: image exactly 0 after normalisation wherever the label is 255, and nowhere else
        # (no coordinate pixel normalises to 0 in all channels: the means are not integers).
        assert np.all(image[~valid] == 0.0)
        assert np.all(np.any(image[valid] != 0.0, axis=-1))

        rgb = config.normalization.invert(image)
        rows, cols = label_r.astype(np.int64), label_c.astype(np.int64)
        err_r = np.round(rgb[..., 0]) - rows
        err_c = np.round(rgb[..., 1]) - cols
        # Nearest picks the source pixel floor(c) holding the sample centre c; bilinear of the
        # coordinate ramp gives c - 0.5, rounded to a grey level: equal, or off by one at exact
        # ties. Within 2 px of the border (antialiasing support at scale >= 0.5) the filter is
        # clipped, which moves the bilinear value by at most one more pixel.
        inner = valid & (rows >= 2) & (rows <= H - 3) & (cols >= 2) & (cols <= W - 3)
        assert np.abs(err_r[inner]).max() <= 1 and np.abs(err_c[inner]).max() <= 1
        assert np.abs(err_r[valid]).max() <= 2 and np.abs(err_c[valid]).max() <= 2
        # A one-pixel shift between image and label would make nearly every error 1.
        assert np.abs(err_r[inner]).mean() < 0.5 and np.abs(err_c[inner]).mean() < 0.5

        # Geometry: row coordinates advance by 1/scale per output row, for an allowed scale.
        valid_rows = np.flatnonzero(valid[:, 0]) if valid[:, 0].any() else np.flatnonzero(valid[:, -1])
        column = 0 if valid[:, 0].any() else -1
        if len(valid_rows) >= 20:
            slope = np.polyfit(valid_rows, rows[valid_rows, column], 1)[0]
            base = min(max(config.base_size) / W, min(config.base_size) / H) if config.base_size else 1.0
            if config.scale_range is None:
                assert min(abs(slope - 1 / (base * s)) for s in config.scales) < 0.05, slope
            else:
                low, high = config.scale_range
                assert 1 / (base * high) - 0.05 < slope < 1 / (base * low) + 0.05, slope
        # Flip: column coordinates decrease along each row when flipped.
        row = np.flatnonzero(valid.any(axis=1))[0]
        row_cols = cols[row][valid[row]]
        if len(row_cols) > 4:
            flips.add(bool(row_cols[0] > row_cols[-1]))
    assert flips == {True, False}


def test_authors_scales_are_what_their_draw_can_give():
    rng = random.Random(0)
    drawn = {0.7 + rng.randint(0, 14) / 10.0 for _ in range(2000)}  # the authors' expression
    assert len(AUTHORS_SCALES) == len(drawn) == 15
    np.testing.assert_allclose(sorted(AUTHORS_SCALES), sorted(drawn), rtol=0, atol=1e-12)


def test_normalisation_values():
    pixel = np.array([[[10, 20, 30]]], dtype=np.uint8)  # R, G, B
    np.testing.assert_allclose(
        CAFFE_BGR(pixel)[0, 0], [30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434], rtol=1e-6
    )
    np.testing.assert_allclose(
        IMAGENET_RGB(pixel)[0, 0],
        [(10 - 123.675) / 58.395, (20 - 116.28) / 57.12, (30 - 103.53) / 57.375],
        rtol=1e-6,
    )


def test_transform_is_a_function_of_the_seed():
    transform = TrainTransform(TrainAugmentConfig(crop_size=(40, 40), photometric=PhotometricConfig()))
    a = transform.random_map({"image": COORD_IMAGE, "label": ROWS.astype(np.uint8)}, np.random.default_rng(5))
    b = transform.random_map({"image": COORD_IMAGE, "label": ROWS.astype(np.uint8)}, np.random.default_rng(5))
    c = transform.random_map({"image": COORD_IMAGE, "label": ROWS.astype(np.uint8)}, np.random.default_rng(6))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])


def test_photometric_changes_colours_not_geometry():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    changed = [not np.array_equal(photometric_distort(image, np.random.default_rng(s), PhotometricConfig()), image)
               for s in range(10)]
    assert sum(changed) >= 8  # each of the 4 effects fires with probability 1/2
    out = photometric_distort(image, np.random.default_rng(3), PhotometricConfig())
    assert out.shape == image.shape and out.dtype == np.uint8
    plain = TrainAugmentConfig(crop_size=(64, 64), flip_prob=0.0)
    coloured = TrainAugmentConfig(crop_size=(64, 64), flip_prob=0.0, photometric=PhotometricConfig())
    for seed in range(5):
        element = {"image": COORD_IMAGE, "label": ROWS.astype(np.uint8)}
        a = TrainTransform(plain).random_map(element, np.random.default_rng(seed))
        b = TrainTransform(coloured).random_map(element, np.random.default_rng(seed))
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"] == 0.0, b["image"] == 0.0)


def test_eval_transform_resize_and_padding():
    element = {"image": COORD_IMAGE, "label": ROWS.astype(np.uint8), "file_name": "x.png"}
    out = EvalTransform(EvalConfig(normalization=IMAGENET_RGB)).map(element)
    np.testing.assert_allclose(IMAGENET_RGB.invert(out["image"]), COORD_IMAGE, atol=1e-4)
    np.testing.assert_array_equal(out["label"], element["label"])
    assert out["file_name"] == "x.png" and (out["height"], out["width"]) == (H, W)

    # Keep-ratio fit inside (long 60, short 60): 100x120 -> 50x60; the label keeps its size.
    out = EvalTransform(EvalConfig(resize=(60, 60), pad_to=(64, 64))).map(element)
    assert (out["height"], out["width"]) == (50, 60) and (out["label_height"], out["label_width"]) == (H, W)
    assert out["image"].shape == (64, 64, 3) and np.all(out["image"][50:] == 0) and np.all(out["image"][:, 60:] == 0)
    np.testing.assert_array_equal(out["label"], element["label"])
    # Resized coordinates: output row r samples source row (r + 0.5) * 2 - 0.5.
    rgb = CAFFE_BGR.invert(out["image"][:50, :60])
    np.testing.assert_allclose(rgb[10:40, 10:50, 0], ROWS[:50, :60][10:40, 10:50] * 2 + 0.5, atol=1.0)

    with pytest.raises(ValueError, match="does not fit"):
        EvalTransform(EvalConfig(pad_to=(64, 64))).map(element)


def test_config_errors_are_explained():
    with pytest.raises(ValueError, match="positive"):
        TrainAugmentConfig(scales=(0.0, 1.0))
    with pytest.raises(ValueError, match="low <= high"):
        TrainAugmentConfig(scale_range=(2.0, 0.5))
