"""Cross-entropy, OHEM and the aligned-corner resize against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ccnet_jax.train import losses


def np_resize_aligned(x, size):
    """Loop-by-loop bilinear resize with align_corners=True, NHWC."""
    b, h, w, c = x.shape
    out = np.zeros((b, size[0], size[1], c), np.float64)
    for oy in range(size[0]):
        sy = oy * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for ox in range(size[1]):
            sx = ox * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, oy, ox] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                              + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_ce(logits, labels):
    up = np_resize_aligned(logits.astype(np.float64), labels.shape[1:])
    logp = np_log_softmax(up)
    valid = labels != 255
    picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None].astype(int), -1)[..., 0]
    return -(picked * valid).sum() / max(valid.sum(), 1), picked, valid


def authors_ohem_group(logits, labels, thresh, min_kept, factor=8):
    """The authors' OhemCrossEntropy2d on one GPU's images, transcribed with numpy and scipy (NCHW).

    Their find_threshold zooms the softmax probabilities (scipy order 1) and the labels
    (order 0) by 1/factor and searches min_kept // factor**2 pixels; generate_new_target
    then ignores every full-size pixel whose true-class probability is above the threshold.
    """
    up = np_resize_aligned(logits.astype(np.float64), labels.shape[1:])
    prob = np.exp(np_log_softmax(up)).transpose(0, 3, 1, 2)  # n, c, h, w
    predict = ndimage.zoom(prob, (1.0, 1.0, 1.0 / factor, 1.0 / factor), order=1)
    target = ndimage.zoom(labels, (1.0, 1.0 / factor, 1.0 / factor), order=0)
    small_min_kept = min_kept // (factor * factor)
    valid_flag = target != 255
    num_valid = valid_flag.sum()
    threshold = 1.0
    if small_min_kept >= num_valid:
        threshold = 1.0
    elif num_valid > 0:
        valid_prob = predict.transpose(1, 0, 2, 3)[:, valid_flag]
        pred = valid_prob[target[valid_flag].astype(int), np.arange(num_valid)]
        threshold = thresh
        if small_min_kept > 0:
            k_th = min(len(pred), small_min_kept) - 1
            new_threshold = np.partition(pred, k_th)[k_th]
            if new_threshold > thresh:
                threshold = new_threshold
    valid = labels != 255
    true_prob = np.take_along_axis(prob, np.where(valid, labels, 0)[:, None].astype(int), 1)[:, 0]
    kept = valid & (true_prob <= threshold)
    log_p = np.log(np.where(kept, true_prob, 1.0))
    return -(log_p * kept).sum() / max(kept.sum(), 1)


def authors_ohem(logits, labels, thresh, min_kept, images_per_group):
    """Every GPU's loss over its own images, averaged (their data-parallel training)."""
    groups = range(0, len(labels), images_per_group)
    return np.mean([authors_ohem_group(logits[g:g + images_per_group], labels[g:g + images_per_group], thresh,
                                       min_kept) for g in groups])


def _case(seed=0, shape=(2, 5, 6, 4), label_size=(13, 11), ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape).astype(np.float32) * 2
    labels = rng.integers(0, shape[-1], (shape[0],) + label_size).astype(np.uint8)
    labels[rng.random(labels.shape) < ignore_frac] = 255
    return logits, labels


def test_resize_matches_numpy_aligned_corners():
    logits, _ = _case()
    got = losses.resize_bilinear(jnp.asarray(logits), (13, 11))
    np.testing.assert_allclose(np.asarray(got), np_resize_aligned(logits, (13, 11)), rtol=1e-5, atol=1e-5)
    # corners map to corners
    np.testing.assert_allclose(np.asarray(got)[:, -1, -1], logits[:, -1, -1], rtol=1e-6)


def test_cross_entropy_matches_numpy_and_ignores_255():
    logits, labels = _case()
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    want, _, _ = np_ce(logits, labels)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert losses.cross_entropy(jnp.asarray(logits), jnp.full_like(jnp.asarray(labels), 255)) == 0.0


def test_cross_entropy_gradient_matches_numpy_finite_differences():
    """The gradient through the resize, the softmax and the true-class pick (ignored pixels
    included) against central differences of the float64 numpy loss."""
    logits, labels = _case(seed=3, shape=(2, 3, 4, 5), label_size=(7, 6))
    got = np.asarray(jax.grad(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels)))
    want = np.zeros(logits.shape)
    step = 1e-4
    base = logits.astype(np.float64)
    for index in np.ndindex(*logits.shape):
        up, down = base.copy(), base.copy()
        up[index] += step
        down[index] -= step
        want[index] = (np_ce(up, labels)[0] - np_ce(down, labels)[0]) / (2 * step)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_cross_entropy_float32_from_bfloat16_logits():
    logits, labels = _case()
    got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    want, _, _ = np_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("min_kept", [0, 64 * 3, 64 * 20, 64 * 1000])
@pytest.mark.parametrize("thresh", [0.3, 0.7])
@pytest.mark.parametrize("images_per_group", [1, 2, 4])
def test_ohem_matches_the_authors_per_group_selection(min_kept, thresh, images_per_group):
    # 4 images of 70x90 labels: the 1/8 threshold search sees 9x11 pixels per image.
    logits, labels = _case(seed=min_kept + images_per_group, shape=(4, 9, 12, 5), label_size=(70, 90))
    got = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), thresh=thresh,
                                          min_kept=min_kept, images_per_group=images_per_group))
    want = authors_ohem(logits, labels, thresh, min_kept, images_per_group)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_ohem_groups_select_on_their_own():
    # A group of easy images keeps only its own hardest pixels; pooled with a hard group it
    # would keep others. Per-group selection differs from one threshold over the batch.
    logits, labels = _case(seed=3, shape=(4, 9, 12, 5), label_size=(70, 90))
    logits[:2] *= 4  # sharper, mostly confident predictions in the first group
    per_group = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), min_kept=64 * 40,
                                                images_per_group=2))
    pooled = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), min_kept=64 * 80,
                                             images_per_group=4))
    assert per_group != pytest.approx(pooled, rel=1e-3)
    with pytest.raises(ValueError, match="do not divide a batch of 4"):
        losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), images_per_group=3)


def test_ohem_ignores_easy_pixels():
    # 16x16 pixels: the left half confidently right (p ~ 1), the right half wrong (p = 0.27).
    # The 1/8 search sees 2x2 pixels and keeps k = 64 // 64 = 1: its smallest probability
    # (0.27) is under 0.7, so the threshold is 0.7 and only the hard half counts.
    logits = np.zeros((1, 16, 16, 2), np.float32)
    logits[0, :, :8] = [10.0, -10.0]
    logits[0, :, 8:] = [0.0, 1.0]
    labels = np.zeros((1, 16, 16), np.uint8)
    got = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), thresh=0.7, min_kept=64,
                                          images_per_group=1))
    np.testing.assert_allclose(got, -np_log_softmax(np.array([0.0, 1.0]))[0], rtol=1e-6)


@pytest.mark.parametrize("bad_label,dtype", [(5, np.uint8), (254, np.uint8), (-1, np.int32)])
def test_a_label_neither_a_class_nor_255_makes_the_losses_nan(bad_label, dtype):
    # Counted as a valid pixel of zero loss, one such label would pass unnoticed.
    logits, labels = _case(seed=5, shape=(2, 9, 12, 5), label_size=(70, 90))
    labels = labels.astype(dtype)
    assert np.isfinite(float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))))
    labels[1, 40, 3] = bad_label
    assert np.isnan(float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))))
    assert np.isnan(float(jax.jit(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))))
    for min_kept in (0, 64 * 1000):  # the pixel above and below the threshold
        assert np.isnan(float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                                        min_kept=min_kept, images_per_group=1)))


@pytest.mark.parametrize("loss", [losses.cross_entropy,
                                  lambda x, y: losses.ohem_cross_entropy(x, y, min_kept=64, images_per_group=1)])
def test_logits_and_labels_of_different_images_are_refused(loss):
    # One label map against two images' logits broadcast: a finite loss of the wrong pairs.
    logits, labels = _case(seed=6, shape=(2, 9, 12, 5), label_size=(70, 90))
    with pytest.raises(ValueError, match="a batch of 2 logits and 1 label maps"):
        loss(jnp.asarray(logits), jnp.asarray(labels[:1]))
    with pytest.raises(ValueError, match=r"logits \(B, h, w, C\) and labels \(B, H, W\)"):
        loss(jnp.asarray(logits[0]), jnp.asarray(labels[0]))
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        loss(jnp.asarray(logits), jnp.asarray(labels, jnp.float32))


def test_segmentation_loss_weights_aux():
    logits, labels = _case()
    aux = logits[..., ::-1].copy()
    total, terms = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(aux), jnp.asarray(labels),
                                            losses.LossConfig(ohem=False, aux_weight=0.4))
    np.testing.assert_allclose(float(total), float(terms["main"]) + 0.4 * float(terms["aux"]), rtol=1e-6)
    np.testing.assert_allclose(float(terms["aux"]), np_ce(aux, labels)[0], rtol=1e-5)


def test_with_ohem_the_aux_term_is_each_groups_mean_as_the_authors_criterion_per_gpu():
    # The first pair of images has most pixels ignored: per group its few pixels weigh as much
    # as the second pair's many; one mean over the batch would let the second pair dominate.
    logits, labels = _case(seed=8, shape=(4, 9, 12, 5), label_size=(70, 90))
    labels[:2, :60] = 255
    aux = logits[..., ::-1].copy()
    config = losses.LossConfig(ohem=True, ohem_min_kept=64, ohem_images_per_group=2, aux_weight=0.4)
    total, terms = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(aux), jnp.asarray(labels), config)
    per_group = np.mean([np_ce(aux[g : g + 2], labels[g : g + 2])[0] for g in (0, 2)])
    np.testing.assert_allclose(float(terms["aux"]), per_group, rtol=1e-5)
    assert abs(per_group - np_ce(aux, labels)[0]) > 1e-3
    want_main = authors_ohem(logits, labels, 0.7, 64, 2)
    np.testing.assert_allclose(float(total), want_main + 0.4 * per_group, rtol=2e-5)
    with pytest.raises(ValueError, match="do not divide a batch of 4"):
        losses.grouped_cross_entropy(jnp.asarray(aux), jnp.asarray(labels), 3)
