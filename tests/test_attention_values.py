"""Values and gradients of both implementations against the float64 dense reference."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import criss_cross_attention, default_config
from pallas_kernels.criss_cross import testing
from pallas_kernels.criss_cross.testing import random_inputs, relative_error, tolerance
from tests.attention_cases import op_kwargs

# (B, H, W, Cqk, Cv): several blocks of 16 along both strips, H != W,
# single-row and single-column maps, one-channel q/k, nothing a power of two.
# With one key block per strip the dK/dQ kernel writes dQ itself, else partial
# sums: the last two shapes mix the two, one per direction, in both orders.
SHAPES = [
    (2, 5, 7, 3, 5),
    (1, 19, 33, 24, 40),
    (3, 1, 9, 4, 6),
    (1, 9, 1, 1, 3),
    (1, 13, 20, 8, 24),
    (2, 20, 13, 8, 24),
]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize(
    "implementation,dtype,shape",
    list(itertools.product(["xla", "triton"], DTYPES, SHAPES)),
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_matches_float64_reference(implementation, dtype, shape):
    b, h, w, cqk, cv = shape
    seed = zlib.crc32(repr((implementation, jnp.dtype(dtype).name, shape)).encode())
    q, k, v, g = random_inputs(seed, b, h, w, cqk, cv, dtype)

    out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, **op_kwargs(implementation)), q, k, v)
    assert out.dtype == v.dtype and out.shape == v.shape
    grads = vjp(g)

    tol = tolerance(dtype, h + w + max(cqk, cv))
    assert relative_error(out, testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", grads, testing.dense_vjp(q, k, v, g)):
        assert grad.dtype == dtype, name
        assert relative_error(grad, ref) < tol, f"d{name}"


@pytest.mark.parametrize("implementation, dtype, shape", [
    ("xla", jnp.float32, (2, 23, 70, 9, 130)),
    pytest.param("triton", jnp.float32, (2, 23, 70, 9, 130), marks=pytest.mark.slow),
    pytest.param("triton", jnp.bfloat16, (1, 66, 70, 9, 40), marks=pytest.mark.slow),
])
def test_default_config_matches_reference(implementation, dtype, shape):
    # No config: the heuristic picks its own (larger) blocks and Cv tiles; in bfloat16 at 66x70,
    # one 128-pixel block per strip, whose dK/dQ kernel writes dQ without partial sums.
    b, h, w, cqk, cv = shape
    if dtype == jnp.bfloat16:
        assert default_config(h, w, cqk, cv, 2).dkq_key_block == 128
    q, k, v, g = random_inputs(7, *shape, dtype)
    kwargs = {"implementation": implementation, "interpret": implementation == "triton"}
    out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, **kwargs), q, k, v)
    tol = tolerance(dtype, h + w + max(cqk, cv))
    assert relative_error(out, testing.dense_forward(q, k, v)) < tol
    for grad, ref in zip(vjp(g), testing.dense_vjp(q, k, v, g)):
        assert relative_error(grad, ref) < tol


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_golden_constant_inputs(implementation):
    q = jnp.ones((2, 6, 5, 4), jnp.float32)
    v = jnp.full((2, 6, 5, 3), 3.0, jnp.float32)
    def f(v):
        return criss_cross_attention(q, 2.0 * q, v, **op_kwargs(implementation))

    np.testing.assert_allclose(f(v), 3.0, rtol=1e-6)
    # Equal energies give every pixel weights 1/(H+W-1), and each pixel is
    # seen by exactly H+W-1 pixels (its row, the rest of its column).
    np.testing.assert_allclose(jax.grad(lambda v: f(v).sum())(v), 1.0, rtol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_huge_energies_stay_finite(implementation):
    # |<q, k>| around 1e4: exp overflows unless the max is subtracted.
    q, k, v, g = random_inputs(3, 1, 7, 6, 1, 5, jnp.float32)
    q, k = 100.0 * q, 100.0 * k
    out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, **op_kwargs(implementation)), q, k, v)
    grads = vjp(g)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
    assert relative_error(out, testing.dense_forward(q, k, v)) < tolerance(jnp.float32, 7 + 6 + 5)
    # The gradient of a saturated softmax is tiny for q and k; compare dv only.
    assert relative_error(grads[2], testing.dense_vjp(q, k, v, g)[2]) < tolerance(jnp.float32, 7 + 6 + 5)
