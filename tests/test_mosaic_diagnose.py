"""experiments/mosaic_diagnose.py: its references and its account of wrong values (the kernels
themselves run there on a Hopper GPU or the interpreter)."""

import jax
import numpy as np

from pallas_kernels.criss_cross.testing import dense_forward, random_inputs
from tests.experiment_scripts import load_experiment


def test_row_and_column_references_merge_into_criss_cross_attention():
    diagnose = load_experiment("mosaic_diagnose")
    q, k, v, _ = random_inputs(3, 2, 5, 7, 4, 6, np.float32)
    o_row, lse_row = diagnose.strip_reference(q, k, v, "row")
    o_col, lse_col = diagnose.strip_reference(q, k, v, "col")
    lse = np.logaddexp(lse_row, lse_col)
    merged = np.exp(lse_row - lse)[..., None] * o_row + np.exp(lse_col - lse)[..., None] * o_col
    np.testing.assert_allclose(merged, dense_forward(q, k, v), rtol=1e-5, atol=1e-6)


def test_wrong_values_are_located_by_strip_position_and_channel_tile():
    diagnose = load_experiment("mosaic_diagnose")
    reference = np.asarray(jax.random.normal(jax.random.key(0), (1, 8, 97, 128)), np.float64)
    assert diagnose.describe(reference, reference, 1e-3, strip_axis=1).startswith("ok")
    wrong = reference.copy()
    wrong[0, 3, 64:80, 64:] = 1e9  # strip 3, positions 64-79, channel tile 1
    wrong[0, 5, 2, 0] = np.nan
    text = diagnose.describe(wrong, reference, 1e-3, strip_axis=1)
    assert text.startswith("BAD") and "nonfinite 1" in text
    assert "strips 3,5" in text and "positions 2,64-79" in text and "channel tiles 0-1" in text
    # A column pass's per-pixel (B, H, W) array: strips along W (axis 2), positions along H.
    per_pixel = reference[..., 0].copy()
    per_pixel[0, 5, 2] = 1e9
    assert "strips 2  positions 5" in diagnose.describe(per_pixel, reference[..., 0], 1e-3, strip_axis=2)
