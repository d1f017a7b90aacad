"""Cross-entropy, OHEM and the aligned-corner resize against numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

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


def np_ohem(logits, labels, thresh, min_kept):
    """The authors' OhemCrossEntropy2d, written with numpy (batch flattened)."""
    _, picked, valid = np_ce(logits, labels)
    prob = np.where(valid, np.exp(picked), 1.0).reshape(-1)
    num_valid = valid.sum()
    kept = valid.reshape(-1).copy()
    if min_kept < num_valid and num_valid > 0:
        threshold = thresh
        if min_kept > 0:
            threshold = max(threshold, np.sort(prob)[min(len(prob), min_kept) - 1])
        kept &= prob <= threshold
    lp = picked.reshape(-1)
    return -(lp * kept).sum() / max(kept.sum(), 1)


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


def test_cross_entropy_float32_from_bfloat16_logits():
    logits, labels = _case()
    got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    want, _, _ = np_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("min_kept", [0, 10, 50, 150, 10_000])
@pytest.mark.parametrize("thresh", [0.3, 0.7])
def test_ohem_matches_numpy(min_kept, thresh):
    logits, labels = _case(seed=min_kept)
    got = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), thresh=thresh, min_kept=min_kept))
    np.testing.assert_allclose(got, np_ohem(logits, labels, thresh, min_kept), rtol=1e-5)


def test_ohem_threshold_rules():
    probs = jnp.asarray([[0.1, 0.5, 0.9, 0.95, 0.2]])
    valid = jnp.asarray([[True, True, True, True, False]])
    # k-th smallest of valid (k=3) is 0.9 > 0.7
    assert float(losses.ohem_threshold(probs, valid, 0.7, 3)) == pytest.approx(0.9)
    # k-th smallest 0.5 < 0.7: the floor wins
    assert float(losses.ohem_threshold(probs, valid, 0.7, 2)) == pytest.approx(0.7)
    # min_kept >= valid count: keep everything
    assert float(losses.ohem_threshold(probs, valid, 0.7, 4)) == 1.0


def test_ohem_ignores_easy_pixels():
    # Two pixels: one confidently right (p ~ 1), one wrong; with min_kept 1 only the hard one counts.
    logits = np.zeros((1, 1, 2, 2), np.float32)
    logits[0, 0, 0] = [10.0, -10.0]
    logits[0, 0, 1] = [0.0, 1.0]
    labels = np.array([[[0, 0]]], np.uint8)
    got = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), thresh=0.7, min_kept=1))
    np.testing.assert_allclose(got, -np_log_softmax(logits[0, 0, 1].astype(np.float64))[0], rtol=1e-6)


def test_segmentation_loss_weights_aux():
    logits, labels = _case()
    aux = logits[..., ::-1].copy()
    total, terms = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(aux), jnp.asarray(labels),
                                            losses.LossConfig(ohem=False, aux_weight=0.4))
    np.testing.assert_allclose(float(total), float(terms["main"]) + 0.4 * float(terms["aux"]), rtol=1e-6)
    np.testing.assert_allclose(float(terms["aux"]), np_ce(aux, labels)[0], rtol=1e-5)
