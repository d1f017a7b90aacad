"""Max pooling with a scatter-free gradient (ccnet_jax.models.max_pool) against jax's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccnet_jax.models.layers import max_pool2d
from ccnet_jax.models.max_pool import max_pool


def native_max_pool(x, kernel, stride, pads):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
                                 ((0, 0), *pads, (0, 0)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, kernel, stride, pads", [
    ((2, 9, 11, 3), 3, 2, ((1, 1), (1, 1))),  # the stem's pool
    ((1, 10, 7, 2), 3, 2, ((1, 2), (1, 1))),  # ceil mode's extra bottom padding
    ((1, 8, 8, 4), 2, 2, ((0, 0), (0, 0))),  # windows that do not overlap
    ((1, 7, 9, 2), 3, 1, ((1, 1), (0, 0))),  # stride 1: each input in up to 9 windows
])
def test_values_and_gradients_are_jax_own_including_ties(dtype, shape, kernel, stride, pads):
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, shape), 0), dtype)
    want, native_vjp = jax.vjp(lambda x: native_max_pool(x, kernel, stride, pads), x)
    got, vjp = jax.vjp(lambda x: max_pool(x, kernel, stride, pads), x)
    g = jnp.asarray(rng.normal(size=want.shape), dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    (dx,), (native_dx,) = vjp(g), native_vjp(g)
    assert dx.dtype == x.dtype
    # Bit for bit, with a cotangent of any values: the same winners, and an input's share of
    # several windows summed in the same order.
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(native_dx, np.float32))


@pytest.mark.parametrize("ceil_mode, pads", [(False, ((1, 1), (1, 0))), (True, ((1, 1), (1, 2)))])
def test_the_layer_pools_and_differentiates_as_jax_under_jit(ceil_mode, pads):
    # 13x12 with PyTorch's 3/2/1 pool: 7x6 windows, or 7x7 in ceil mode (two more columns of padding).
    x = jax.random.normal(jax.random.key(1), (2, 13, 12, 3))
    layer = jax.jit(jax.value_and_grad(lambda x: jnp.sum(max_pool2d(x, 3, 2, 1, ceil_mode) ** 2)))
    native = jax.value_and_grad(lambda x: jnp.sum(native_max_pool(x, 3, 2, pads) ** 2))
    assert max_pool2d(x, 3, 2, 1, ceil_mode).shape == (2, 7, 7 if ceil_mode else 6, 3)
    (value, grad), (native_value, native_grad) = layer(x), native(x)
    np.testing.assert_allclose(float(value), float(native_value), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(native_grad))


@pytest.mark.parametrize("devices", [1, 4])
def test_every_windows_gradient_lands_when_xla_recomputes_the_input(devices):
    """The pool's input computed in the same program (BatchNorm-like, then ReLU), which XLA may
    recompute inside the backward's fusions with other rounding. Shifting it by t shifts every
    window's maximum by t, so d/dt is the cotangent's sum exactly when each window's gradient
    lands on one input. (A first version, which found winners by equality with the forward's
    output, lost 1 and 3 of them here, on 1 and 4 devices.)"""
    from jax.sharding import NamedSharding, PartitionSpec

    from ccnet_jax.train.step import make_mesh

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(4, 33, 41, 8)), jnp.float32)
    g = jnp.asarray(rng.integers(1, 4, size=(4, 17, 21, 8)), jnp.float32)

    def pooled_sum(t, a):
        normalised = (a - a.mean((0, 1, 2))) * jax.lax.rsqrt(a.var((0, 1, 2)) + 1e-5)
        return jnp.sum(max_pool(jax.nn.relu(normalised * 1.3 + 0.1) + t, 3, 2, ((1, 1), (1, 1))) * g)

    mesh = make_mesh(devices=jax.devices()[:devices])
    with jax.set_mesh(mesh):
        a = jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))
        assert float(jax.jit(jax.grad(pooled_sum))(0.0, a)) == float(jnp.sum(g))
