"""float32 tiles as scaled float16 pairs (CrissCrossConfig(float32_dot="f16x3")): the split, the
three-product dot, and the Triton kernels running it (interpreter and CUDA lowering)."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import criss_cross_attention
from pallas_kernels.criss_cross import testing
from pallas_kernels.criss_cross.tile_products import TOP_EXPONENT, pair_dot, split, split_rows


def _parts(pair):
    return [np.asarray(x, np.float64) for x in (pair.hi, pair.lo)] + [float(pair.unscale)]


@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1.0, 3e4, 1e30])
def test_split_scales_the_largest_value_into_its_band_and_keeps_22_bits(magnitude):
    x = jax.random.normal(jax.random.key(0), (64, 48), jnp.float32) * jnp.float32(magnitude)
    hi, lo, unscale = _parts(split(x))
    exact = np.asarray(x, np.float64)
    assert np.log2(unscale) == int(np.log2(unscale))  # a power of two: the scaling itself is exact
    top = np.max(np.abs(hi))
    assert 2.0**TOP_EXPONENT <= top < 2.0 ** (TOP_EXPONENT + 1)
    error = np.abs((hi + lo) * unscale - exact)
    # Every value to 2^-22 of itself, or to float16's last step (2^-24 after scaling) if smaller.
    assert np.all(error <= np.maximum(2.0**-22 * np.abs(exact), 2.0**-24 * unscale))
    assert np.max(error) <= 2.0**-22 * np.max(np.abs(exact))
    # hi alone would not do: lo carries the next 11 bits.
    assert np.max(np.abs(hi * unscale - exact)) > 2.0**-14 * np.max(np.abs(exact))


def test_split_of_zeros_is_zero_and_non_finite_elements_leave_the_others_exact():
    hi, lo, unscale = _parts(split(jnp.zeros((16, 16), jnp.float32)))
    assert np.isfinite(unscale) and unscale > 0
    np.testing.assert_array_equal(hi + lo, 0.0)
    x = jnp.linspace(-3.0, 5.0, 256, dtype=jnp.float32).reshape(16, 16)
    for bad in (jnp.inf, jnp.nan):
        hi, lo, unscale = _parts(split(x.at[3, 4].set(bad)))
        back = (hi + lo) * unscale
        assert not np.isfinite(back[3, 4])
        finite = np.ones(back.shape, bool)
        finite[3, 4] = False
        exact = np.asarray(x, np.float64)[finite]
        np.testing.assert_array_less(np.abs(back[finite] - exact), 2.0**-22 * np.abs(exact) + 2.0**-30)


def test_unit_interval_split_takes_the_fixed_scale():
    p = jax.random.uniform(jax.random.key(1), (32, 64), jnp.float32) ** 8  # down to tiny values
    hi, lo, unscale = _parts(split(p, unit_interval=True))
    assert unscale == 2.0**-TOP_EXPONENT
    exact = np.asarray(p, np.float64)
    assert np.all(np.abs((hi + lo) * unscale - exact) <= np.maximum(2.0**-22 * exact, 2.0**-37))


def test_row_split_keeps_every_row_to_22_bits_of_its_own_largest_value():
    # The Mosaic float32 backward splits dS a row at a time (its products sum within a row), in
    # column blocks that must share each row's scale. Rows 30 orders of magnitude apart: one
    # scale for the whole array would leave the small rows in float16's subnormals.
    x = jax.random.normal(jax.random.key(2), (64, 128), jnp.float32)
    x = x * jnp.float32(10.0) ** jnp.linspace(-20.0, 10.0, 64, dtype=jnp.float32)[:, None]
    x = x.at[5].set(0.0)  # a row of zeros (padded queries) takes a finite scale
    blocks = split_rows([x[:, :64], x[:, 64:]])
    unscale = np.asarray(blocks[0].unscale, np.float64)
    assert unscale.shape == (64,)
    np.testing.assert_array_equal(unscale, np.asarray(blocks[1].unscale, np.float64))
    assert np.all(np.isfinite(unscale)) and np.all(unscale > 0)
    assert np.all(np.log2(unscale) == np.round(np.log2(unscale)))
    hi = np.concatenate([np.asarray(b.hi, np.float64) for b in blocks], axis=1)
    lo = np.concatenate([np.asarray(b.lo, np.float64) for b in blocks], axis=1)
    exact = np.asarray(x, np.float64)
    top = np.max(np.abs(hi), axis=1)
    live = np.arange(64) != 5
    assert np.all((2.0**TOP_EXPONENT <= top[live]) & (top[live] < 2.0 ** (TOP_EXPONENT + 1)))
    np.testing.assert_array_equal(hi[5] + lo[5], 0.0)
    error = np.abs((hi + lo) * unscale[:, None] - exact)
    assert np.all(error.max(axis=1) <= 2.0**-22 * np.abs(exact).max(axis=1))
    whole = split(x)  # one scale: the small rows are lost
    back = (np.asarray(whole.hi, np.float64) + np.asarray(whole.lo, np.float64)) * float(whole.unscale)
    assert np.max(np.abs(back[0] - exact[0])) > 0.5 * np.max(np.abs(exact[0]))


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
def test_pair_dot_is_float32_accurate_where_bfloat16_pairs_are_not(magnitude, trans_a, trans_b):
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.normal(ka, (64, 96) if trans_a else (96, 64), jnp.float32) * jnp.float32(magnitude)
    b = jax.random.normal(kb, (48, 64) if trans_b else (64, 48), jnp.float32)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    exact = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    got = np.asarray(pair_dot(split(a), split(b), trans_a=trans_a, trans_b=trans_b), np.float64)
    error = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert error < 1e-6
    # One bfloat16 part per operand, as a check that the tolerance can fail.
    a16, b16 = (np.asarray(x.astype(jnp.bfloat16), np.float64) for x in (a, b))
    rough = (a16.T if trans_a else a16) @ (b16.T if trans_b else b16)
    assert np.linalg.norm(rough - exact) / np.linalg.norm(exact) > 1e-4


@pytest.mark.parametrize("shape", [(1, 7, 9, 5, 7), (2, 19, 33, 24, 40)], ids=str)
@pytest.mark.parametrize("magnitude", [1e-3, pytest.param(1.0, marks=pytest.mark.slow), 40.0])
def test_triton_kernels_with_float16_pairs_match_float64_reference(shape, magnitude):
    # Small inputs are where an unscaled float16 split fails (emulated: 1e-1 in dq and dk at 1e-3).
    # Large q and k would make the softmax one-hot, with gradients of no size to compare against:
    # only v and the cotangent grow.
    b, h, w, cqk, cv = shape
    q, k, v, g = testing.random_inputs(zlib.crc32(repr((shape, magnitude)).encode()), *shape, jnp.float32)
    q, k = (x * np.float32(min(magnitude, 1.0)) for x in (q, k))
    v, g = (x * np.float32(magnitude) for x in (v, g))
    config = dataclasses.replace(testing.SMALL_BLOCKS, float32_dot="f16x3")
    out, vjp = jax.vjp(
        lambda q, k, v: criss_cross_attention(q, k, v, implementation="triton", interpret=True, config=config),
        q, k, v,
    )
    tol = testing.tolerance(jnp.float32, h + w + max(cqk, cv))
    assert out.dtype == jnp.float32
    assert testing.relative_error(out, testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", vjp(g), testing.dense_vjp(q, k, v, g)):
        assert grad.dtype == jnp.float32, name
        assert testing.relative_error(grad, ref) < tol, f"d{name}"
