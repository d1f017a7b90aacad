"""The Flax modules as a library user builds them into a model: what their constructors refuse, the
Linen head's parameter tree, and gamma's gradient in a 16-bit layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccnet_jax.models import (
    AttentionOp,
    AuxHead,
    CCNetConfig,
    CrissCrossAttention,
    NonLocalBlock,
    RCCAHead,
)
from ccnet_jax.models import linen as linen_models

XLA = AttentionOp("xla")


def _bf16(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.bfloat16)


def _linen_init(module, channels=16):
    return module.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 4, channels)))


def _cca_gamma_gradient(layer_kind):
    """(error, scale) of autodiff's gamma gradient for a bfloat16 layer with gamma = 0.5 under the
    loss sum(y * w): d/dgamma is the sum of w * out over every element, here taken in float64 from
    the same bfloat16 `out` the gradient was computed with; scale is the sum of the terms' magnitudes."""
    x, w = _bf16((2, 13, 15, 32), 0), _bf16((2, 13, 15, 32), 1)
    outputs = []

    def recording(q, k, v):
        outputs.append(XLA(q, k, v))
        return outputs[-1]

    def loss_of(y):
        # The attention output of this very trace comes back as the aux value.
        return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)), outputs[-1]

    if layer_kind == "nnx":
        layer = CrissCrossAttention(32, attention_fn=recording, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        layer.gamma[...] = jnp.float32(0.5)
        grads, out = nnx.jit(nnx.grad(lambda m: loss_of(m(x)), has_aux=True))(layer)
        grad = grads["gamma"][...]
    else:
        module = linen_models.CrissCrossAttention(attention_fn=recording, dtype=jnp.bfloat16)
        params = {**module.init(jax.random.PRNGKey(0), x)["params"], "gamma": jnp.float32(0.5)}
        grads, out = jax.jit(jax.grad(lambda p: loss_of(module.apply({"params": p}, x)), has_aux=True))(params)
        grad = grads["gamma"]
    assert out.dtype == jnp.bfloat16
    terms = np.asarray(out, np.float64) * np.asarray(w, np.float64)
    return abs(float(grad) - terms.sum()), np.abs(terms).sum()


@pytest.mark.parametrize("layer_kind", ["nnx", "linen"])
def test_gamma_gradient_of_a_bfloat16_layer_is_accumulated_in_float32(layer_kind):
    # Accumulated in bfloat16, the sum over 2*13*15*32 products was 9e-4 of its terms' magnitude
    # off (30% of the gradient); in float32, 5e-10.
    error, scale = _cca_gamma_gradient(layer_kind)
    assert error <= 1e-5 * scale
    if layer_kind == "nnx":
        _assert_no_float32_copy_of_the_output_is_kept()


def _assert_no_float32_copy_of_the_output_is_kept():
    """The float32 gradient must not cost a float32 (B, H, W, C) residual in a 16-bit layer (with an
    op that keeps nothing itself, the values standing for its output)."""
    from jax._src.ad_checkpoint import saved_residuals

    layer = CrissCrossAttention(16, attention_fn=lambda q, k, v: v, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return nnx.merge(graphdef, params)(x).astype(jnp.float32).sum()

    kept = [aval for aval, _ in saved_residuals(loss, params, _bf16((1, 5, 6, 16), 2)) if aval.ndim == 4]
    assert [aval.dtype for aval in kept if aval.shape == (1, 5, 6, 16)] == [jnp.bfloat16] * 2  # x and out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CrissCrossAttention(0, rngs=nnx.Rngs(0)), "CrissCrossAttention: channels must be an integer >= 1"),
        (lambda: CrissCrossAttention(16, qk_channels=0, rngs=nnx.Rngs(0)), "qk_channels must be an integer >= 1"),
        (lambda: CrissCrossAttention(16, qk_channels=-1, rngs=nnx.Rngs(0)), "qk_channels must be an integer >= 1"),
        (lambda: RCCAHead(16, 8, 0, rngs=nnx.Rngs(0)), "RCCAHead: num_classes must be an integer >= 1, got 0"),
        (lambda: RCCAHead(16, 0, 3, rngs=nnx.Rngs(0)), "RCCAHead: channels must be an integer >= 1"),
        (lambda: RCCAHead(16, 8, 3, recurrence=1.5, rngs=nnx.Rngs(0)), "recurrence must be an integer >= 0"),
        (lambda: RCCAHead(16, 8, 3, dropout=1.5, rngs=nnx.Rngs(0)), r"dropout must be a probability in \[0, 1\]"),
        (lambda: RCCAHead(16, 8, 3, attention="nonlocal", remat_attention="some", rngs=nnx.Rngs(0)),
         "remat_attention='some'"),
        (lambda: AuxHead(16, 8, 0, rngs=nnx.Rngs(0)), "AuxHead: num_classes must be an integer >= 1"),
        (lambda: AuxHead(16, 8, 3, dropout=-0.1, rngs=nnx.Rngs(0)), r"AuxHead: dropout must be a probability"),
        (lambda: NonLocalBlock(0, rngs=nnx.Rngs(0)), "NonLocalBlock: channels must be an integer >= 1"),
        (lambda: NonLocalBlock(16, inner_channels=0, rngs=nnx.Rngs(0)), "inner_channels must be an integer >= 1"),
        (lambda: linen_models.CrissCrossAttention(qk_channels=0), "qk_channels must be an integer >= 1"),
        (lambda: linen_models.RCCAHead(3, channels=8, recurrence=-1), "RCCAHead: recurrence must be an integer >= 0"),
        (lambda: linen_models.RCCAHead(0, channels=8), "RCCAHead: num_classes must be an integer >= 1"),
    ],
)
def test_module_constructors_refuse_counts_and_rates_out_of_range(make, message):
    # Before, these built a module that returned logits with no classes, silently skipped the
    # attention (a negative Linen recurrence) or zeroed every channel (dropout > 1), or failed with a
    # ZeroDivisionError / MLIR error naming nothing the caller passed.
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CCNetConfig(implementation="cuda"), "CCNetConfig: unknown implementation 'cuda'"),
        (lambda: CCNetConfig(attention="CCA"), "CCNetConfig: attention 'CCA' is not one of"),
        (lambda: CCNetConfig(recurrence=-1), "CCNetConfig: recurrence must be an integer >= 0"),
        (lambda: CCNetConfig(dropout=2.0), r"CCNetConfig: dropout must be a probability in \[0, 1\]"),
        (lambda: AttentionOp("cuda"), "AttentionOp: unknown implementation 'cuda'; use one of 'xla'"),
        (lambda: AttentionOp("xla", kernel_config={"block_q": 32}), "kernel_config must be a CrissCrossConfig"),
    ],
)
def test_op_and_model_configs_are_checked_where_they_are_made(make, message):
    # Before, each was accepted and failed only when a model was built from it or first called.
    with pytest.raises(ValueError, match=message):
        make()


def test_linen_head_without_recurrence_has_the_nnx_heads_parameters():
    # The module docstring promises one parameter tree for both; at R = 0 the Linen head had no "cca".
    nnx_head = RCCAHead(16, 8, 3, recurrence=0, attention_fn=XLA, rngs=nnx.Rngs(0))
    params = _linen_init(linen_models.RCCAHead(3, channels=8, recurrence=0, attention_fn=XLA))["params"]
    expected = nnx.to_pure_dict(nnx.state(nnx_head, nnx.Param))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, expected)
