"""Compositions with jit, vmap, grad and sharding; determinism; input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels import criss_cross_attention, sharded_criss_cross_attention
from pallas_kernels.criss_cross.testing import SMALL_BLOCKS, random_inputs, relative_error, tolerance
from tests.attention_cases import op_kwargs

IMPLEMENTATIONS = ["xla", "triton"]


def _loss(implementation):
    def loss(q, k, v, g):
        return jnp.sum(criss_cross_attention(q, k, v, **op_kwargs(implementation)) * g)

    return loss


def test_pallas_is_bitwise_deterministic():
    q, k, v, g = random_inputs(11, 2, 9, 18, 5, 20, jnp.float32)
    grad = jax.jit(jax.grad(_loss("triton"), argnums=(0, 1, 2)))
    first = grad(q, k, v, g)
    second = grad(q, k, v, g)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_and_grad_compose(implementation):
    q, k, v, g = random_inputs(12, 1, 6, 17, 3, 7, jnp.float32)
    loss = _loss(implementation)
    eager = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, g)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, g)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # value_and_grad under jit gives the same value as the plain call.
    value, _ = jax.jit(jax.value_and_grad(loss))(q, k, v, g)
    np.testing.assert_allclose(value, loss(q, k, v, g), rtol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", pytest.param("triton", marks=pytest.mark.slow)])
def test_vmap_matches_a_loop(implementation):
    # An extra leading axis of 3 problems, each (B=2, 5, 7).
    qs, ks, vs, gs = random_inputs(13, 6, 5, 7, 4, 6, jnp.float32)
    qs, ks, vs, gs = (x.reshape(3, 2, 5, 7, -1) for x in (qs, ks, vs, gs))
    def f(q, k, v):
        return criss_cross_attention(q, k, v, **op_kwargs(implementation))

    batched = jax.vmap(f)(qs, ks, vs)
    looped = jnp.stack([f(qs[i], ks[i], vs[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)
    loss = _loss(implementation)
    batched_grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(qs, ks, vs, gs)
    for i in range(3):
        for a, b in zip(batched_grads, jax.grad(loss, argnums=(0, 1, 2))(qs[i], ks[i], vs[i], gs[i])):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vmap_of_the_mosaic_kernels_matches_a_loop_bit_for_bit():
    # The Mosaic kernels' second direction writes over the first's results through refs, which
    # vmap carries into each kernel as an extra grid axis: every problem's values and gradients are
    # the unbatched call's, to the bit (bfloat16: four kernels, cheaper to interpret than float32's six).
    qs, ks, vs, gs = random_inputs(14, 2, 3, 5, 4, 6, jnp.bfloat16)
    qs, ks, vs, gs = (x.reshape(2, 1, 3, 5, -1) for x in (qs, ks, vs, gs))

    def loss(q, k, v, g):
        return jnp.sum(criss_cross_attention(q, k, v, **op_kwargs("mosaic")).astype(jnp.float32) * g)

    batched = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2)))(qs, ks, vs, gs)
    for i in range(2):
        looped = jax.value_and_grad(loss, argnums=(0, 1, 2))(qs[i], ks[i], vs[i], gs[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(looped)):
            np.testing.assert_array_equal(np.asarray(a[i], np.float32), np.asarray(b, np.float32))


def _mesh():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, set by conftest)")
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def test_sharded_batch_equals_unsharded_xla():
    mesh = _mesh()
    q, k, v, g = random_inputs(14, 4, 6, 9, 3, 5, jnp.float32)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    loss = _loss("xla")
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    sharded = value_and_grad(*(jax.device_put(x, sharding) for x in (q, k, v, g)))
    single = value_and_grad(q, k, v, g)
    # The partitioned program may sum in another order: equal up to float32
    # rounding, bounded like every other float32 comparison.
    tol = tolerance(jnp.float32, 6 + 9 + 5)
    assert relative_error(sharded[0], np.asarray(single[0], np.float64)) < tol
    for a, b in zip(sharded[1], single[1]):
        assert relative_error(a, np.asarray(b, np.float64)) < tol


def test_sharded_pallas_under_shard_map_equals_unsharded():
    mesh = _mesh()
    q, k, v, g = random_inputs(15, 4, 6, 9, 3, 5, jnp.float32)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    kwargs = {"implementation": "triton", "interpret": True, "config": SMALL_BLOCKS}

    def sharded_loss(q, k, v, g):
        return jnp.sum(sharded_criss_cross_attention(q, k, v, mesh=mesh, batch_axis="data", **kwargs) * g)

    out = jax.jit(lambda q, k, v: sharded_criss_cross_attention(q, k, v, mesh=mesh, **kwargs))(
        *(jax.device_put(x, sharding) for x in (q, k, v))
    )
    assert out.sharding.spec == PartitionSpec("data")
    tol = tolerance(jnp.float32, 6 + 9 + 5)
    assert relative_error(out, np.asarray(criss_cross_attention(q, k, v, **kwargs), np.float64)) < tol
    grads = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(*(jax.device_put(x, sharding) for x in (q, k, v, g)))
    for a, b in zip(grads, jax.grad(_loss("triton"), argnums=(0, 1, 2))(q, k, v, g)):
        assert relative_error(a, np.asarray(b, np.float64)) < tol


def test_plain_op_on_a_batch_sharded_over_an_explicit_mesh_runs_the_kernels_per_shard():
    # jax.make_mesh's axes are Explicit: a pallas_call on inputs sharded over them failed deep inside
    # Pallas ("sharded ref ... can only be sliced along unsharded axes"). The op now runs per shard,
    # eagerly and under jit, with one input replicated, and keeps the batch sharded.
    _mesh()
    mesh = jax.make_mesh((4,), ("data",))
    q, k, v, g = random_inputs(17, 4, 4, 9, 3, 5, jnp.float32)
    kwargs = {"implementation": "triton", "interpret": True, "config": SMALL_BLOCKS}
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    qs, ks, vs, gs = (jax.device_put(x, sharding) for x in (q, k, v, g))
    single = criss_cross_attention(q, k, v, **kwargs)
    tol = tolerance(jnp.float32, 4 + 9 + 5)
    for out in (criss_cross_attention(qs, ks, vs, **kwargs),
                jax.jit(lambda q, k, v: criss_cross_attention(q, k, v, **kwargs))(qs, k, vs)):
        assert out.sharding.spec[0] == "data"
        assert relative_error(out, np.asarray(single, np.float64)) < tol
    grads = jax.jit(jax.grad(_loss("triton"), argnums=(0, 1, 2)))(qs, ks, vs, gs)
    for a, b in zip(grads, jax.grad(_loss("triton"), argnums=(0, 1, 2))(q, k, v, g)):
        assert relative_error(a, np.asarray(b, np.float64)) < tol
    with pytest.raises(ValueError, match=r"q's H axis is sharded over mesh axes 'data'.*shard the batch only"):
        criss_cross_attention(jax.device_put(q, NamedSharding(mesh, PartitionSpec(None, "data"))), k, v, **kwargs)


def test_sharded_wrapper_rejects_bad_mesh_use():
    mesh = _mesh()
    q, k, v, _ = random_inputs(16, 6, 3, 3, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match="does not divide"):
        sharded_criss_cross_attention(q, k, v, mesh=mesh, implementation="xla")
    with pytest.raises(ValueError, match="no 'batch'"):
        sharded_criss_cross_attention(q, k, v, mesh=mesh, batch_axis="batch", implementation="xla")


def _arrays(*shapes, dtype=jnp.float32):
    return [jnp.zeros(s, dtype) for s in shapes]


@pytest.mark.parametrize(
    "arrays,message",
    [
        (_arrays((2, 3, 4), (2, 3, 4), (2, 3, 4)), r"q must be NHWC of rank 4.*\(2, 3, 4\)"),
        (_arrays((1, 3, 4, 2), (1, 3, 4, 2), (1, 3, 4, 2, 1)), r"v must be NHWC of rank 4"),
        (_arrays((1, 3, 4, 2), (1, 3, 5, 2), (1, 3, 4, 2)), r"same shape.*\(1, 3, 4, 2\).*\(1, 3, 5, 2\)"),
        (_arrays((1, 3, 4, 2), (1, 3, 4, 3), (1, 3, 4, 2)), r"same shape"),
        (_arrays((1, 3, 4, 2), (1, 3, 4, 2), (2, 3, 4, 2)), r"v must share q's \(B, H, W\)"),
        (_arrays((1, 3, 4, 2), (1, 3, 4, 2), (1, 4, 3, 2)), r"v must share"),
        (_arrays((1, 0, 4, 2), (1, 0, 4, 2), (1, 0, 4, 2)), r"empty dimension"),
        (_arrays((1, 3, 4, 2), (1, 3, 4, 2), (1, 3, 4, 2), dtype=jnp.int32), r"q has dtype int32"),
        (
            [jnp.zeros((1, 3, 4, 2)), jnp.zeros((1, 3, 4, 2)), jnp.zeros((1, 3, 4, 2), jnp.bfloat16)],
            r"share one dtype.*v bfloat16",
        ),
    ],
)
def test_bad_inputs_raise_value_error(arrays, message):
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(ValueError, match=message):
            criss_cross_attention(*arrays, **op_kwargs(implementation))


def test_unknown_implementation_and_missing_gpu_are_reported():
    q, k, v = _arrays((1, 3, 4, 2), (1, 3, 4, 2), (1, 3, 4, 2))
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        criss_cross_attention(q, k, v, implementation="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret=True"):
            criss_cross_attention(q, k, v, implementation="triton")


def test_default_implementation_is_xla_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the default depends on the dtype (tests/test_attention_gpu.py checks it)")
    q, k, v, _ = random_inputs(17, 1, 4, 5, 2, 3, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, v: criss_cross_attention(q, k, v))(q, k, v)
    assert "pallas_call" not in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda q, k, v: criss_cross_attention(q, k, v, interpret=True))(q, k, v)
    assert "pallas_call" in str(jaxpr)


def test_pallas_saves_only_inputs_output_and_lse_for_the_backward():
    from jax._src.ad_checkpoint import saved_residuals

    b, h, w, cqk, cv = 2, 5, 7, 3, 4
    q, k, v, _ = random_inputs(18, b, h, w, cqk, cv, jnp.float32)

    def shapes(implementation):
        def f(q, k, v):
            return criss_cross_attention(q, k, v, **op_kwargs(implementation))

        return sorted(aval.shape for aval, _ in saved_residuals(f, q, k, v))

    # O(B·H·W·(Cqk + Cv)): q, k, v, out and the per-pixel log-sum-exp.
    assert shapes("triton") == sorted([(b, h, w, cqk)] * 2 + [(b, h, w, cv)] * 2 + [(b, h, w)])
    # The check can fail: autodiff of the xla path keeps the (B, H, W, H+W) weights.
    assert (b, h, w, h + w) in shapes("xla")
