"""The model components as a user's own Flax code takes them: wrong inputs, integer inputs, a mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccnet_jax import numpy_reference as ref
from ccnet_jax.models import (
    AttentionOp,
    AuxHead,
    CCNet,
    CCNetConfig,
    CrissCrossAttention,
    NonLocalBlock,
    RCCAHead,
    ResNet,
    ResNetConfig,
)
from ccnet_jax.models import linen as linen_models
from pallas_kernels import criss_cross_attention, criss_cross_attention_reference

C = 16
XLA = AttentionOp("xla")


def random_x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def tiny_backbone():
    return ResNetConfig(width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS)


MODULES = {
    "CrissCrossAttention": (lambda: CrissCrossAttention(C, attention_fn=XLA, rngs=nnx.Rngs(0)), C),
    "RCCAHead": (lambda: RCCAHead(C, 8, 3, attention_fn=XLA, rngs=nnx.Rngs(0)), C),
    "AuxHead": (lambda: AuxHead(C, 8, 3, rngs=nnx.Rngs(0)), C),
    "NonLocalBlock": (lambda: NonLocalBlock(C, rngs=nnx.Rngs(0)), C),
    "ResNet": (lambda: ResNet(tiny_backbone(), rngs=nnx.Rngs(0)), 3),
    "CCNet": (
        lambda: CCNet(config=CCNetConfig(num_classes=3, width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS),
                      rngs=nnx.Rngs(0)),
        3,
    ),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nchw_unbatched_and_wrong_channel_inputs_say_what_to_pass(name):
    build, channels = MODULES[name]
    module = nnx.eval_shape(build)
    cases = {
        (1, channels, 9, 11): r"this looks like NCHW; transpose it with x\.transpose\(0, 2, 3, 1\)",
        (9, 11, channels): rf"add the batch axis, x\[None\] is \(1, 9, 11, {channels}\)",
        (1, 9, 11, channels + 1): rf"the last axis must hold the {channels} channels",
    }
    for shape, hint in cases.items():
        message = rf"{name} expects NHWC input \(B, H, W, {channels}\); got shape {re.escape(str(shape))}: {hint}"
        with pytest.raises(ValueError, match=message):
            module(jax.ShapeDtypeStruct(shape, jnp.float32))


def test_linen_modules_say_that_they_want_a_batch():
    x = jnp.zeros((9, 11, C))
    for module, name in (
        (linen_models.CrissCrossAttention(attention_fn=XLA), "CrissCrossAttention"),
        (linen_models.RCCAHead(3, channels=C, attention_fn=XLA), "RCCAHead"),
    ):
        with pytest.raises(ValueError, match=rf"{name} expects NHWC input .* add the batch axis"):
            module.init(jax.random.key(0), x)


def test_integer_input_to_the_attention_layer_is_not_truncated():
    layer = CrissCrossAttention(C, attention_fn=XLA, rngs=nnx.Rngs(0))
    layer.gamma[...] = jnp.asarray(0.5)
    ints = jnp.asarray(np.random.default_rng(1).integers(0, 255, (1, 5, 7, C)), jnp.int32)
    expected = layer(ints.astype(jnp.float32))
    assert float(jnp.abs(expected - jnp.round(expected)).max()) > 0.1  # would show a truncation
    out = layer(ints)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, expected)

    linen_layer = linen_models.CrissCrossAttention(attention_fn=XLA)
    params = {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))}
    assert linen_layer.apply(params, ints).dtype == jnp.float32
    np.testing.assert_allclose(linen_layer.apply(params, ints), expected, rtol=1e-6, atol=1e-5)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):  # float inputs keep their dtype
        assert layer(ints.astype(dtype)).dtype == dtype
        assert linen_layer.apply(params, ints.astype(dtype)).dtype == dtype


def test_an_implementation_name_as_attention_fn_names_attention_op():
    for build in (
        lambda: CrissCrossAttention(C, attention_fn="xla", rngs=nnx.Rngs(0)),
        lambda: RCCAHead(C, 8, 3, attention_fn="xla", rngs=nnx.Rngs(0)),
        lambda: linen_models.CrissCrossAttention(attention_fn="xla").init(jax.random.key(0), jnp.ones((1, 3, 4, C))),
    ):
        with pytest.raises(TypeError, match=r"attention_fn must be a function of \(q, k, v\), got 'xla'; "
                                            r"for an implementation by name pass AttentionOp\('xla'\)"):
            build()


def test_the_op_takes_numpy_arrays():
    rng = np.random.default_rng(2)
    q, k = (rng.normal(size=(2, 3, 5, 4)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    out = criss_cross_attention(q, k, v)
    assert out.shape == (2, 3, 5, 6) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, criss_cross_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))


def test_attention_op_on_a_make_mesh_mesh_takes_a_batch_not_yet_on_it():
    if jax.device_count() < 4:
        pytest.fail(f"needs 4 devices (tests/conftest.py sets them), found {jax.device_count()}.")
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])  # Explicit axes
    layer = CrissCrossAttention(C, attention_fn=AttentionOp("xla", mesh=mesh, batch_axis="data"), rngs=nnx.Rngs(0))
    plain = CrissCrossAttention(C, attention_fn=XLA, rngs=nnx.Rngs(0))
    for module in (layer, plain):
        module.gamma[...] = jnp.asarray(0.5)
    x = random_x((4, 5, 7, C), seed=3)
    expected = plain(x)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("width", 2.5, "width must be an integer >= 1, got 2.5"),
    ("width", True, "width must be an integer >= 1, got True"),
    ("blocks", (1, 1.5, 1, 1), r"each of blocks \(1, 1.5, 1, 1\) must be an integer >= 1, got 1.5"),
    ("multi_grid", (1.5,), r"each of multi_grid \(1.5,\) must be an integer >= 1, got 1.5"),
    ("depth", 101.0, "depth must be an integer >= 1, got 101.0"),
])
def test_fractional_counts_are_refused_by_the_config_not_by_flax_later(field, value, message):
    # They were accepted, and failed building or running the model with a TypeError of Flax's.
    with pytest.raises(ValueError, match=f"ResNetConfig: {message}"):
        ResNetConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        CCNetConfig(num_classes=3, **{field: value})


def test_a_ccnet_config_refuses_an_interpret_that_is_not_a_bool():
    # It was refused only when a model was built from the config, by AttentionOp.
    with pytest.raises(ValueError, match="CCNetConfig: interpret must be True or False, got 'yes'"):
        CCNetConfig(num_classes=3, interpret="yes")


def test_arguments_beside_a_config_that_says_otherwise_are_refused():
    # CCNet(19, config=CCNetConfig(num_classes=5)) built a 5-class model without a word.
    config = CCNetConfig(num_classes=3, width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS)
    with pytest.raises(ValueError, match=r"CCNet: num_classes=19 \(config has 3\), depth=50 \(config has 101\)"):
        CCNet(19, depth=50, config=config, rngs=nnx.Rngs(0))
    assert CCNet(3, config=config, rngs=nnx.Rngs(0)).config is config
    model = CCNet(3, recurrence=1, rngs=nnx.Rngs(0))
    assert (model.config.depth, model.config.recurrence, model.config.stem, model.config.output_stride) == (
        101, 1, "deep", 8)


def test_attention_op_checks_its_mesh_axis_where_it_is_configured():
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"AttentionOp: mesh has axes \('data',\), no 'batch'"):
        AttentionOp("xla", mesh=mesh, batch_axis="batch")


def test_the_layer_computes_in_its_dtype_and_by_default_as_flax_promotes():
    # The docstring said None meant the input's dtype; Flax promotes a bfloat16 input with the
    # float32 parameters, so the attention ran in float32.
    seen = []

    def attention(q, k, v):
        seen.append((q.dtype, v.dtype))
        return criss_cross_attention_reference(q, k, v)

    x = random_x((1, 3, 5, C)).astype(jnp.bfloat16)
    assert CrissCrossAttention(C, attention_fn=attention, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16
    CrissCrossAttention(C, attention_fn=attention, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
    assert seen == [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16)]
