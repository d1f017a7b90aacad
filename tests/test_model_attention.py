"""The attention layers: CCA (NNX and Linen), the RCCA head variants and the non-local block."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccnet_jax import config as experiment_config
from ccnet_jax import numpy_reference as ref
from ccnet_jax.models import AttentionOp, CCNetConfig, CrissCrossAttention, NonLocalBlock, RCCAHead
from ccnet_jax.models import linen as linen_models

C = 32


def random_x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def set_(variable, value):
    variable.set_value(jnp.asarray(value, variable.dtype).reshape(variable.shape))


def test_fresh_cca_is_the_identity():
    cca = CrissCrossAttention(C, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(0))
    assert float(cca.gamma[...]) == 0.0
    x = random_x((2, 5, 7, C))
    np.testing.assert_array_equal(cca(x), x)


def test_gamma_receives_the_attention_output_as_gradient():
    cca = CrissCrossAttention(C, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(0))
    x = random_x((2, 5, 7, C))
    r = random_x((2, 5, 7, C), seed=1)

    def loss(module):
        return jnp.sum(module(x) * r)

    grads = nnx.grad(loss)(cca)
    expected = float(jnp.sum(r * cca.attend(x)))
    assert abs(expected) > 1e-3
    np.testing.assert_allclose(float(grads.gamma[...]), expected, rtol=1e-5)
    # At gamma = 0 the output does not depend on the projections yet.
    assert float(jnp.abs(grads.query_conv.kernel[...]).max()) == 0.0


def test_golden_case_constant_q_k_v():
    # q = 1, k = 2, v = 3 everywhere gives out = 3 at every pixel (equal weights summing to 1).
    cca = CrissCrossAttention(C, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(0))
    for conv, value in ((cca.query_conv, 1.0), (cca.key_conv, 2.0), (cca.value_conv, 3.0)):
        set_(conv.kernel, np.zeros(conv.kernel.shape))
        set_(conv.bias, np.full(conv.bias.shape, value))
    set_(cca.gamma, 0.5)
    x = random_x((1, 4, 6, C))
    np.testing.assert_allclose(cca(x), x + 1.5, rtol=1e-6, atol=1e-6)


def test_cca_matches_numpy_reference_and_its_attention_map():
    cca = CrissCrossAttention(C, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(2))
    set_(cca.gamma, 0.8)
    x = random_x((2, 6, 5, C), seed=3)
    sd = {f"cca.{name}.{leaf}": np.asarray(v) for name in ("query_conv", "key_conv", "value_conv")
          for leaf, v in (("weight", np.transpose(getattr(cca, name).kernel[...], (3, 2, 0, 1))),
                          ("bias", getattr(cca, name).bias[...]))}
    sd["cca.gamma"] = np.array([0.8], np.float32)
    expected = ref.criss_cross(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)), sd, "cca")
    actual = np.transpose(np.asarray(cca(x)), (0, 3, 1, 2))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    a_col, a_row = cca.attention_map(x)
    assert a_col.shape == (2, 6, 5, 6) and a_row.shape == (2, 6, 5, 5)
    np.testing.assert_allclose(a_col.sum(-1) + a_row.sum(-1), 1.0, rtol=1e-5)
    diagonal = a_col[:, np.arange(6), :, np.arange(6)]
    assert float(jnp.abs(diagonal).max()) == 0.0


def test_linen_cca_equals_nnx_with_the_same_parameters():
    cca = CrissCrossAttention(C, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(4))
    set_(cca.gamma, -0.6)
    x = random_x((2, 5, 4, C), seed=5)
    params = nnx.to_pure_dict(nnx.state(cca, nnx.Param))
    module = linen_models.CrissCrossAttention(attention_fn=AttentionOp("xla"))
    shapes = jax.tree.map(jnp.shape, module.init(jax.random.key(0), x)["params"])
    assert shapes == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(module.apply({"params": params}, x), cca(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_linen_rcca_head_equals_nnx_head(train):
    head = RCCAHead(64, 16, 3, recurrence=2, dropout=0.0, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(6))
    set_(head.cca.gamma, 0.9)
    for bn in (head.conva.bn, head.convb.bn, head.bottleneck.bn):
        set_(bn.mean, np.linspace(-0.5, 0.5, bn.mean.shape[0]))
        set_(bn.var, np.linspace(0.5, 2.0, bn.var.shape[0]))
    params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    batch_stats = nnx.to_pure_dict(nnx.state(head, nnx.BatchStat))
    x = random_x((2, 6, 5, 64), seed=7)
    module = linen_models.RCCAHead(num_classes=3, channels=16, recurrence=2, dropout=0.0,
                                   attention_fn=AttentionOp("xla"))
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        head.train()
        actual, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        expected = head(x)
        np.testing.assert_allclose(
            updates["batch_stats"]["bottleneck"]["bn"]["mean"], head.bottleneck.bn.mean[...], rtol=1e-5, atol=1e-6
        )
    else:
        head.eval()
        actual, expected = module.apply(variables, x, train=False), head(x)
    assert actual.shape == (2, 6, 5, 3)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_head_variants():
    x = random_x((1, 5, 6, 64), seed=8)
    plain = RCCAHead(64, 16, 3, attention="none", rngs=nnx.Rngs(0))
    assert not hasattr(plain, "cca") and not hasattr(plain, "nonlocal_block")
    nonlocal_head = RCCAHead(64, 16, 3, attention="nonlocal", rngs=nnx.Rngs(0))
    assert nonlocal_head.nonlocal_block.theta.kernel.shape == (1, 1, 16, 8)
    # R = 0 keeps the CCA weights (as the authors' network does) but never applies them.
    r0 = RCCAHead(64, 16, 3, recurrence=0, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(0))
    r0.eval()
    before = r0(x)
    set_(r0.cca.gamma, 5.0)
    np.testing.assert_array_equal(r0(x), before)
    r1 = RCCAHead(64, 16, 3, recurrence=1, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(0))
    r1.eval()
    set_(r1.cca.gamma, 5.0)
    assert float(jnp.abs(r1(x) - before).max()) > 1e-3
    with pytest.raises(ValueError, match="attention"):
        RCCAHead(64, 16, 3, attention="dense", rngs=nnx.Rngs(0))


def test_nonlocal_block_is_identity_when_fresh_and_matches_numpy():
    block = NonLocalBlock(16, rngs=nnx.Rngs(9))
    block.eval()
    x = random_x((2, 4, 5, 16), seed=10)
    np.testing.assert_array_equal(block(x), x)
    set_(block.out_bn.scale, np.linspace(0.5, 1.5, 16))
    set_(block.out_bn.mean, np.linspace(-0.2, 0.2, 16))
    set_(block.out_bn.var, np.linspace(0.8, 1.2, 16))
    xs = np.asarray(x, np.float64).reshape(2, 20, 16)

    def proj(conv):
        return xs @ np.asarray(conv.kernel[...], np.float64)[0, 0] + np.asarray(conv.bias[...], np.float64)

    theta, phi, g = proj(block.theta), proj(block.phi), proj(block.g)
    attention = ref.softmax(np.einsum("bpc,bqc->bpq", theta, phi), axis=-1)
    y = np.einsum("bpq,bqc->bpc", attention, g)
    z = y @ np.asarray(block.out_conv.kernel[...], np.float64)[0, 0] + np.asarray(block.out_conv.bias[...])
    mean, var, scale, bias = (np.asarray(v[...], np.float64) for v in (block.out_bn.mean, block.out_bn.var,
                                                                       block.out_bn.scale, block.out_bn.bias))
    z = (z - mean) / np.sqrt(var + 1e-5) * scale + bias
    expected = (xs + z).reshape(2, 4, 5, 16)
    np.testing.assert_allclose(block(x), expected, rtol=1e-4, atol=1e-5)


def test_cca_layer_on_the_pallas_kernel_in_interpret_mode():
    xla = CrissCrossAttention(16, attention_fn=AttentionOp("xla"), rngs=nnx.Rngs(11))
    pallas = CrissCrossAttention(16, attention_fn=AttentionOp("triton", interpret=True), rngs=nnx.Rngs(11))
    for layer in (xla, pallas):
        set_(layer.gamma, 0.7)
    x = random_x((1, 5, 6, 16), seed=12)
    np.testing.assert_allclose(pallas(x), xla(x), rtol=2e-5, atol=2e-5)


def _layer_loss(layer, x):
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    return loss, params


def test_each_remat_level_keeps_what_it_says_and_gives_the_same_gradients():
    from jax._src.ad_checkpoint import saved_residuals

    x = random_x((1, 5, 6, C), seed=13)
    kept, grads = {}, {}
    for remat in ("none", "projections", "all"):
        layer = CrissCrossAttention(C, attention_fn=AttentionOp("triton", interpret=True), remat=remat,
                                    rngs=nnx.Rngs(14))
        set_(layer.gamma, 0.6)
        loss, params = _layer_loss(layer, x)
        kept[remat] = sorted(aval.shape for aval, _ in saved_residuals(loss, params, x) if aval.ndim >= 3)
        grads[remat] = jax.grad(loss, argnums=(0, 1))(params, x)
    # Every level keeps the weights, the input x and (for the squared loss) the layer's output.
    # "projections" adds the attention output and its lse; "none" adds q, k (C // 8 channels) and v.
    weights_input_output = [(1, 1, C, C // 8)] * 2 + [(1, 1, C, C)] + [(1, 5, 6, C)] * 2
    assert kept["all"] == sorted(weights_input_output)
    with_attention = weights_input_output + [(1, 5, 6, C), (1, 5, 6)]
    assert kept["projections"] == sorted(with_attention)
    assert kept["none"] == sorted(with_attention + [(1, 5, 6, C // 8)] * 2 + [(1, 5, 6, C)])
    for remat in ("projections", "all"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_remat_levels_are_checked_and_old_boolean_configs_still_load():
    with pytest.raises(ValueError, match="remat=True; use one of 'none', 'projections', 'all'"):
        CrissCrossAttention(C, remat=True, rngs=nnx.Rngs(0))
    for saved, level in ((True, "projections"), (False, "none"), ("all", "all")):
        assert CCNetConfig.from_dict({"remat_attention": saved}).remat_attention == level
        assert experiment_config.from_dict({"model": {"remat_attention": saved}}).model.remat_attention == level
    with pytest.raises(ValueError, match="remat_attention"):
        CCNetConfig.from_dict({"remat_attention": "some"})
    with pytest.raises(experiment_config.ConfigError, match="model"):
        experiment_config.from_dict({"model": None})


def test_remat_with_the_mosaic_interpreter_is_refused():
    with pytest.raises(ValueError, match="remat='projections' cannot run the Mosaic GPU interpreter"):
        CrissCrossAttention(C, attention_fn=AttentionOp("mosaic", interpret=True), remat="projections",
                            rngs=nnx.Rngs(0))


def test_any_attention_function_stands_in_for_the_op():
    calls = []

    def constant(q, k, v):
        calls.append((q.shape, k.shape, v.shape))
        return jnp.ones_like(v)

    layer = CrissCrossAttention(16, attention_fn=constant, rngs=nnx.Rngs(0))
    set_(layer.gamma, 0.5)
    x = random_x((2, 5, 6, 16), seed=3)
    np.testing.assert_allclose(layer(x), x + 0.5, rtol=1e-6)
    assert calls == [((2, 5, 6, 2), (2, 5, 6, 2), (2, 5, 6, 16))]
    head = RCCAHead(16, 16, 3, recurrence=2, attention_fn=constant, rngs=nnx.Rngs(1))
    head(x)
    assert len(calls) == 3  # the head hands the same function to its layer, called once per recurrence
