"""experiments/mosaic_diagnose.py: its references, its account of wrong values, and every check
on a small map in the Mosaic GPU interpreter (on a Hopper GPU it runs the same checks compiled)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.criss_cross.testing import dense_forward, dense_vjp, random_inputs
from tests.experiment_scripts import load_experiment


def _merged(diagnose, q, k, v):
    """(out, lse) of criss-cross attention from the script's row and column references."""
    o_row, lse_row = diagnose.strip_reference(q, k, v, "row")
    o_col, lse_col = diagnose.strip_reference(q, k, v, "col")
    lse = np.logaddexp(lse_row, lse_col)
    return np.exp(lse_row - lse)[..., None] * o_row + np.exp(lse_col - lse)[..., None] * o_col, lse


def test_row_and_column_references_merge_into_criss_cross_attention():
    diagnose = load_experiment("mosaic_diagnose")
    q, k, v, _ = random_inputs(3, 2, 5, 7, 4, 6, np.float32)
    merged, _ = _merged(diagnose, q, k, v)
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


def test_the_two_directions_gradients_sum_to_the_criss_cross_vjp():
    diagnose = load_experiment("mosaic_diagnose")
    q, k, v, g = random_inputs(5, 2, 5, 7, 4, 6, np.float32)
    out, lse = _merged(diagnose, q, k, v)
    delta = np.sum(np.asarray(g, np.float64) * out, axis=-1)
    row = diagnose.strip_gradients(q, k, v, g, lse, delta, "row")
    col = diagnose.strip_gradients(q, k, v, g, lse, delta, "col")
    for name, r, c, want in zip(("dq", "dk", "dv"), row, col, dense_vjp(q, k, v, g)):
        np.testing.assert_allclose(r + c, want, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.abs(r).max() > 1e-3 and np.abs(c).max() > 1e-3, name  # each direction contributes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float32, marks=pytest.mark.slow)])
def test_every_pass_of_the_mosaic_kernels_checks_out_in_the_interpreter(dtype):
    diagnose = load_experiment("mosaic_diagnose")
    lines = diagnose.check((1, 3, 5, 8, 16), "tiles", jnp.dtype(dtype), interpret=True)
    names = [line.split()[:2] for line in lines]
    expected = [[name, label] for name in ("row", "col", "op") for label in ("out", "lse")]
    expected += [[name, label] for name in ("bwd-row", "bwd-col", "bwd") for label in ("dq", "dk", "dv")]
    assert names == expected
    assert all(line.split()[2] == "ok" for line in lines), lines


def test_a_map_the_float32_kernels_cannot_take_is_skipped_with_the_reason():
    diagnose = load_experiment("mosaic_diagnose")
    (line,) = diagnose.check((1, 8, 200, 64, 64), "rows", jnp.dtype(jnp.float32), interpret=True)
    assert line.startswith("skipped:") and "float32" in line
