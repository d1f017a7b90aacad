"""Linen versions of the criss-cross attention layer and the RCCA head, for Linen codebases.

Same op, same semantics and the same parameter tree as the NNX modules
(`nnx.to_pure_dict(nnx.state(nnx_head, nnx.Param))` is a valid `params`
for `RCCAHead` here, and the BatchStat dict a valid `batch_stats`). NHWC.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ccnet_jax.models.criss_cross import AttentionFn, AttentionOp, check_attention_fn, scaled_residual
from ccnet_jax.models.layers import (
    BN_EPSILON,
    BN_MOMENTUM,
    Activation,
    activate,
    check_count,
    check_nhwc,
    check_rate,
    torch_bias_init,
    torch_conv_kernel_init,
)


def _conv(features: int, kernel: int, in_channels: int, *, use_bias: bool, name: str, dtype: Any) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=torch_conv_kernel_init,
        bias_init=torch_bias_init(in_channels * kernel * kernel),
        name=name,
    )


class CrissCrossAttention(nn.Module):
    """y = gamma * CCA(q, k, v) + x with 1x1 projections (C -> C/8, C/8, C) and gamma = 0 at init.

    Attributes: qk_channels (default C // 8), attention_fn computing the attention from (q, k, v)
    (see `ccnet_jax.models.AttentionOp`), dtype of the projections. Input and output (B, H, W, C).
    """

    qk_channels: int | None = None
    attention_fn: AttentionFn = AttentionOp()
    dtype: Any = None

    def __post_init__(self):
        if self.qk_channels is not None:
            check_count(self.qk_channels, "qk_channels", "CrissCrossAttention")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_attention_fn(self.attention_fn, "CrissCrossAttention")
        check_nhwc(x, None, "CrissCrossAttention")
        c = x.shape[-1]
        qk = max(1, c // 8) if self.qk_channels is None else self.qk_channels
        q = _conv(qk, 1, c, use_bias=True, name="query_conv", dtype=self.dtype)(x)
        k = _conv(qk, 1, c, use_bias=True, name="key_conv", dtype=self.dtype)(x)
        v = _conv(c, 1, c, use_bias=True, name="value_conv", dtype=self.dtype)(x)
        gamma = self.param("gamma", nn.initializers.zeros, (), jnp.float32)
        return scaled_residual(gamma, self.attention_fn(q, k, v), x)


class ConvBN(nn.Module):
    """kxk conv (PyTorch padding k // 2), BN (momentum 0.9, eps 1e-5), activation."""

    features: int
    kernel: int = 3
    use_bias: bool = False
    activation: Activation = "leaky_relu"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = _conv(self.features, self.kernel, x.shape[-1], use_bias=self.use_bias, name="conv", dtype=self.dtype)(x)
        y = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype, name="bn"
        )(y)
        return activate(y, self.activation)


class RCCAHead(nn.Module):
    """The RCCA head (see `ccnet_jax.models.RCCAHead`): conva, CCA x recurrence, convb,
    concat with the input, bottleneck, Dropout2d, 1x1 classifier.

    Call with `train=True` for batch statistics (mutable=['batch_stats']) and
    dropout (rngs={'dropout': key}). Input (B, H, W, C_in); logits (B, H, W, num_classes).
    """

    num_classes: int
    channels: int = 512
    recurrence: int = 2
    dropout: float = 0.1
    attention_fn: AttentionFn = AttentionOp()
    dtype: Any = None

    def __post_init__(self):
        # As the NNX head checks them; here a negative recurrence would silently skip the attention.
        check_count(self.num_classes, "num_classes", "RCCAHead")
        check_count(self.channels, "channels", "RCCAHead")
        check_count(self.recurrence, "recurrence", "RCCAHead", minimum=0)
        check_rate(self.dropout, "dropout", "RCCAHead")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_nhwc(x, None, "RCCAHead")
        y = ConvBN(self.channels, dtype=self.dtype, name="conva")(x, train=train)
        cca = CrissCrossAttention(attention_fn=self.attention_fn, dtype=self.dtype, name="cca")
        if self.recurrence == 0 and self.is_initializing():
            # The NNX head keeps the layer's weights at R = 0 (as the authors' network does): run it
            # once, its output unused, so that the parameter trees stay interchangeable.
            cca(y)
        for _ in range(self.recurrence):
            y = cca(y)
        y = ConvBN(self.channels, dtype=self.dtype, name="convb")(y, train=train)
        y = ConvBN(self.channels, dtype=self.dtype, name="bottleneck")(
            jnp.concatenate([x, y.astype(x.dtype)], axis=-1), train=train
        )
        y = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(y)
        return _conv(self.num_classes, 1, self.channels, use_bias=True, name="classifier", dtype=self.dtype)(y)
