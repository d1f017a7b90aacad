"""Dilated convs as undilated ones over space-to-batch sub-images: the same function as XLA's
dilated conv, in the backbone too, and sharded like the batch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from ccnet_jax import numpy_reference as ref
from ccnet_jax.models import CCNet, CCNetConfig, ResNetConfig
from ccnet_jax.models.atrous import conv_function, space_to_batch_conv
from ccnet_jax.train.step import make_mesh


def _conv(conv, x, w, strides, padding, dilation):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return conv(x, w, strides, padding, None, dilation, dn, precision=lax.Precision.HIGHEST)


# (B, H, W, Cin, Cout, kernel, dilation, padding): sizes that the dilation does not divide,
# different dilations per axis, padding unlike the dilation (none, one-sided, larger), a 1x1
# kernel, and the CCNet backbone's cases (3x3 padded by its dilation of 2 and 4).
CASES = [
    (2, 97 // 8, 13, 3, 4, 3, (2, 2), ((2, 2), (2, 2))),
    (1, 13, 7, 2, 5, 3, (4, 4), ((4, 4), (4, 4))),
    (1, 5, 6, 2, 2, 3, (4, 3), ((4, 4), (3, 3))),
    (2, 10, 11, 3, 3, 2, (3, 2), ((1, 0), (0, 2))),
    (1, 17, 17, 2, 2, 3, (2, 2), ((0, 0), (0, 0))),
    (1, 9, 8, 2, 3, 3, (2, 5), ((7, 1), (0, 6))),
    (1, 6, 7, 4, 2, 1, (3, 3), ((1, 2), (0, 0))),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_space_to_batch_is_the_dilated_conv(case):
    b, h, w, cin, cout, k, dilation, padding = case
    kx, kw, kg = jax.random.split(jax.random.key(h * w + k), 3)
    x = jax.random.normal(kx, (b, h, w, cin))
    kernel = jax.random.normal(kw, (k, k, cin, cout))
    want = _conv(lax.conv_general_dilated, x, kernel, (1, 1), padding, dilation)
    got = _conv(space_to_batch_conv, x, kernel, (1, 1), padding, dilation)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    g = jax.random.normal(kg, want.shape)
    grads = [jax.vjp(lambda x, kernel: _conv(conv, x, kernel, (1, 1), padding, dilation), x, kernel)[1](g)
             for conv in (space_to_batch_conv, lax.conv_general_dilated)]
    for conv_grad, native_grad in zip(*grads):
        np.testing.assert_allclose(conv_grad, native_grad, rtol=1e-5, atol=1e-4)


def test_convs_it_does_not_rewrite_go_to_xla_unchanged():
    # Strided, 'SAME'-padded and undilated convs are XLA's own: the same program, the same bits.
    x = jax.random.normal(jax.random.key(0), (1, 11, 9, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    for strides, padding, dilation in [((2, 2), ((2, 2), (2, 2)), (2, 2)), ((1, 1), "SAME", (2, 2)),
                                       ((1, 1), ((1, 1), (1, 1)), (1, 1))]:
        hlo = jax.jit(lambda x, kernel: _conv(space_to_batch_conv, x, kernel, strides, padding, dilation)).lower(
            x, kernel).as_text()
        assert "transpose" not in hlo and hlo.count("stablehlo.convolution") == 1
        np.testing.assert_array_equal(_conv(space_to_batch_conv, x, kernel, strides, padding, dilation),
                                      _conv(lax.conv_general_dilated, x, kernel, strides, padding, dilation))


def _tiny(dilated_convs, **kwargs):
    config = CCNetConfig(num_classes=ref.TINY_CLASSES, width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS,
                         implementation="xla", dropout=0.0, dilated_convs=dilated_convs, **kwargs)
    model = CCNet(config=config, rngs=nnx.Rngs(3))
    model.head.cca.gamma.set_value(jnp.asarray(0.5))
    model.eval()
    return model


@pytest.mark.slow
def test_backbone_gives_the_same_logits_and_gradients_either_way():
    # Same parameters (the choice adds none), same function: weights trained or converted under
    # one load into the other.
    native, rewritten = _tiny("native"), _tiny("space_to_batch")
    assert jax.tree.map(jnp.shape, nnx.state(native, nnx.Param)) == jax.tree.map(
        jnp.shape, nnx.state(rewritten, nnx.Param))
    x = jax.random.normal(jax.random.key(4), (2, 41, 33, 3))

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            main, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(main**2) + jnp.sum(aux**2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_n, grads_n), (loss_r, grads_r) = loss_and_grads(native), loss_and_grads(rewritten)
    np.testing.assert_allclose(loss_r, loss_n, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_n)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def _convolutions(model) -> list[str]:
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, jnp.zeros((1, 41, 33, 3))).as_text()
    return [line for line in hlo.splitlines() if "stablehlo.convolution" in line]


def test_space_to_batch_hands_xla_no_dilated_conv_and_auto_does_on_the_cpu():
    # Output stride 8: layer3 dilates by 2, layer4 by 4. "auto" rewrites them for CUDA GPUs only
    # (tests/test_conv_compile_h100.py compiles it for an H100).
    native = _convolutions(_tiny("native"))
    assert any("rhs_dilate = [2, 2]" in c for c in native) and any("rhs_dilate = [4, 4]" in c for c in native)
    rewritten = _convolutions(_tiny("space_to_batch"))
    dilations = {d for c in rewritten for d in re.findall(r"rhs_dilate = (\[\d+, \d+\])", c)}
    assert len(rewritten) == len(native) and dilations == {"[1, 1]"}
    assert _convolutions(_tiny("auto")) == native


def test_a_sharded_batch_stays_sharded_through_the_rewrite():
    # Each image's sub-images sit next to it on the batch axis: no collective moves them. The
    # training step's mesh (sharding propagated by XLA).
    mesh = make_mesh(devices=jax.devices()[:4])
    x = jax.device_put(jax.random.normal(jax.random.key(0), (4, 13, 11, 8)), NamedSharding(mesh, PartitionSpec("data")))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    step = jax.jit(jax.grad(lambda x, k: jnp.sum(_conv(space_to_batch_conv, x, k, (1, 1), ((2, 2), (2, 2)),
                                                        (2, 2)) ** 2), argnums=(0, 1)))
    compiled = step.lower(x, kernel).compile().as_text()
    exchanges = [op for op in ("all-gather", "all-to-all", "collective-permute") if op in compiled]
    assert not exchanges, exchanges
    dx, _ = step(x, kernel)
    assert dx.sharding.spec[0] == "data"


def test_unknown_choice_names_the_choices():
    with pytest.raises(ValueError, match="use 'auto', 'space_to_batch' or 'native'"):
        ResNetConfig(dilated_convs="im2col")
    with pytest.raises(ValueError, match="use 'auto', 'space_to_batch' or 'native'"):
        conv_function("fast")
    config = CCNetConfig(num_classes=3, dilated_convs="native")
    assert CCNetConfig.from_dict(config.to_dict()) == config
    assert CCNetConfig.from_dict({"num_classes": 3}).dilated_convs == "auto"
