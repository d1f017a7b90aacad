"""experiments/split_precision.py: float32 values and products from bfloat16 parts."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.experiment_scripts import load_experiment


def test_three_bfloat16_parts_hold_a_float32_exactly_and_two_hold_16_bits():
    script = load_experiment("split_precision")
    x = jax.random.normal(jax.random.key(0), (4096,), jnp.float32)
    exact = np.asarray(x, np.float64)
    three = sum(np.asarray(part, np.float64) for part in script.split(x, 3))
    two = sum(np.asarray(part, np.float64) for part in script.split(x, 2))
    np.testing.assert_array_equal(three, exact)
    assert np.max(np.abs(two - exact) / np.abs(exact)) <= 2.0**-16
    assert np.max(np.abs(two - exact) / np.abs(exact)) > 2.0**-24  # two parts do lose bits


def test_six_part_products_are_float32_accurate():
    script = load_experiment("split_precision")
    a, b = (jax.random.normal(key, (32, 64), jnp.float32) for key in jax.random.split(jax.random.key(1)))
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    got = np.asarray(script.split_product("ik,jk->ij", a, b, 3), np.float64)
    three = np.asarray(script.split_product("ik,jk->ij", a, b, 2), np.float64)
    error, error_three = (np.linalg.norm(x - exact) / np.linalg.norm(exact) for x in (got, three))
    assert error < 1e-6 < error_three


def test_float16_pairs_need_their_scale_for_small_operands():
    script = load_experiment("split_precision")
    a, b = (jax.random.normal(key, (32, 64), jnp.float32) * 1e-3 for key in jax.random.split(jax.random.key(2)))
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    scaled, unscaled = (np.asarray(script.pair_product("ik,jk->ij", a, b, scaled=s), np.float64) for s in (True, False))
    error, error_unscaled = (np.linalg.norm(x - exact) / np.linalg.norm(exact) for x in (scaled, unscaled))
    assert error < 1e-6 < error_unscaled
