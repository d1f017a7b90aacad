"""Confusion matrix / mIoU against numpy; sliding window and multi-scale inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccnet_jax.evaluation import inference, metrics


def np_confusion(pred, label, n):
    out = np.zeros((n, n), np.int64)
    for p, t in zip(pred.ravel(), label.ravel()):
        if t < n:
            out[t, p] += 1
    return out


def test_confusion_and_miou_match_numpy():
    rng = np.random.default_rng(0)
    n = 5
    pred = rng.integers(0, n, (3, 7, 9))
    label = rng.integers(0, n, (3, 7, 9))
    label[rng.random(label.shape) < 0.2] = 255
    got = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), n))
    want = np_confusion(pred, label, n)
    np.testing.assert_array_equal(got, want)
    ious = [want[c, c] / (want[c].sum() + want[:, c].sum() - want[c, c]) for c in range(n)]
    np.testing.assert_allclose(metrics.class_iou(want), ious)
    assert metrics.mean_iou(want) == pytest.approx(np.mean(ious))
    assert metrics.mean_iou(want, classes=(1, 3)) == pytest.approx((ious[1] + ious[3]) / 2)


def test_predictions_outside_the_classes_are_refused_and_never_land_in_another_cell():
    # With 3 classes, label 1 and prediction 5 made index 8: a true positive of class 2; -1 was
    # clipped into (label, 0)... cells that no such pixel belongs to.
    pred = jnp.array([0, 1, 2, 5, -1, 7])
    label = jnp.array([0, 1, 1, 1, 1, 255])
    with pytest.raises(ValueError, match=r"2 pixel\(s\) predicted outside the 3 classes \[0, 3\), e.g. \[-1, 5\]"):
        metrics.confusion_matrix(pred, label, 3)
    # Under jit the values cannot be looked at: the two pixels count nowhere.
    got = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(pred, label, 3))
    np.testing.assert_array_equal(got, [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    # An ignored pixel's prediction is not looked at.
    np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix(jnp.array([7]), jnp.array([255]), 3)),
                                  np.zeros((3, 3)))


def test_absent_class_is_left_out_of_the_mean():
    confusion = np.array([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
    iou = metrics.class_iou(confusion)
    assert np.isnan(iou[2])
    assert metrics.mean_iou(confusion) == pytest.approx((5 / 8 + 4 / 7) / 2)
    table = metrics.format_table(confusion, ["a", "b", "c"])
    assert "n/a" in table and "0.6250" in table


def _conv_apply(seed=0, stride=4, classes=3):
    """A small translation-covariant stand-in for a network: conv + pooling to stride 4."""
    kernel = jax.random.normal(jax.random.key(seed), (3, 3, 3, classes))

    def apply(images):
        y = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, stride, stride, 1), (1, stride, stride, 1), "SAME")

    return apply


def test_window_starts_cover_and_end_flush():
    assert inference.window_starts(1024, 769, 513) == [0, 255]
    assert inference.window_starts(2048, 769, 513) == [0, 513, 1026, 1279]
    assert inference.window_starts(500, 769, 513) == [0]


def test_sliding_window_equals_whole_image_when_one_window_is_the_image():
    images = jax.random.normal(jax.random.key(1), (2, 33, 45, 3))
    apply = _conv_apply()
    sliding = inference.sliding_window_logits(apply, images, (33, 45), (16, 16))
    np.testing.assert_array_equal(np.asarray(sliding), np.asarray(inference.whole_image_logits(apply, images)))


def _authors_padded_tile(apply, tile, crop):
    """The authors' predict_sliding on one tile: zeros below and right up to the crop, the network,
    logits resized to the crop, the tile's corner kept."""
    rows, cols = tile.shape[1:3]
    padded = np.pad(np.asarray(tile), ((0, 0), (0, crop[0] - rows), (0, crop[1] - cols), (0, 0)))
    return np.asarray(inference.whole_image_logits(apply, jnp.asarray(padded)))[:, :rows, :cols]


def test_an_image_smaller_than_the_crop_is_padded_to_it_as_the_authors_pad_their_tiles():
    # Both axes short: one window, the zero-padded image. Only rows short (scale 0.75 of a
    # 1024x2048 image is 768 rows against a 769 crop): a row of windows, each padded below.
    apply = _conv_apply()
    images = jax.random.normal(jax.random.key(4), (2, 33, 45, 3))
    got = np.asarray(inference.sliding_window_logits(apply, images, (40, 48), (16, 16)))
    want = _authors_padded_tile(apply, images, (40, 48))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - np.asarray(inference.whole_image_logits(apply, images))).max() > 1e-3

    images = jax.random.normal(jax.random.key(5), (1, 15, 40, 3))
    crop, stride = (16, 16), (12, 12)
    got = np.asarray(inference.sliding_window_logits(apply, images, crop, stride))
    total, count = np.zeros(got.shape), np.zeros(got.shape[:3] + (1,))
    for left in inference.window_starts(40, 16, 12):
        total[:, :, left : left + 16] += _authors_padded_tile(apply, images[:, :, left : left + 16], crop)
        count[:, :, left : left + 16] += 1
    assert inference.window_starts(40, 16, 12) == [0, 12, 24]
    np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-6)


def test_sliding_window_averages_overlapping_tiles():
    images = jax.random.normal(jax.random.key(2), (1, 20, 28, 3))
    apply = _conv_apply()
    crop, stride = (12, 16), (8, 12)
    got = np.asarray(inference.sliding_window_logits(apply, images, crop, stride))
    total = np.zeros(got.shape)
    count = np.zeros(got.shape[:3] + (1,))
    for top in inference.window_starts(20, 12, 8):
        for left in inference.window_starts(28, 16, 12):
            tile = images[:, top : top + 12, left : left + 16]
            total[:, top : top + 12, left : left + 16] += np.asarray(inference.whole_image_logits(apply, tile))
            count[:, top : top + 12, left : left + 16] += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-6)


def test_multiscale_flip_is_the_mean_of_its_parts():
    images = jax.random.normal(jax.random.key(3), (1, 24, 32, 3))
    apply = _conv_apply()
    config = inference.InferenceConfig(scales=(0.5, 1.0), flip=True)
    got = np.asarray(inference.predict_logits(apply, images, config))
    parts = []
    for scale in (0.5, 1.0):
        from ccnet_jax.models.resize import resize_bilinear

        x = images if scale == 1.0 else resize_bilinear(images, (12, 16))
        parts.append(resize_bilinear(inference.whole_image_logits(apply, x), (24, 32)))
        flipped = inference.whole_image_logits(apply, x[:, :, ::-1])[:, :, ::-1]
        parts.append(resize_bilinear(flipped, (24, 32)))
    np.testing.assert_allclose(got, np.mean([np.asarray(p) for p in parts], 0), rtol=1e-5, atol=1e-6)


def test_bad_inference_config_says_what_to_fix():
    with pytest.raises(ValueError, match="eval.mode"):
        inference.InferenceConfig(mode="tiles")


def test_the_program_does_not_grow_with_the_number_of_windows():
    # The network (one convolution here) appears once in the lowered program, for 2 windows as for 15,
    # and for a flipped copy too.
    apply = _conv_apply()
    config = inference.InferenceConfig(mode="sliding", crop_size=(16, 16), stride=(8, 8), flip=True)

    def convolutions(height, width):
        images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        text = jax.jit(lambda x: inference.predict_logits(apply, x, config)).lower(images).as_text()
        return text.count("stablehlo.convolution")

    assert inference.window_starts(16, 16, 8) == [0] and len(inference.window_starts(24, 16, 8)) == 2
    assert convolutions(16, 24) == convolutions(40, 48) == 1
