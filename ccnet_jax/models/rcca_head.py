"""The recurrent criss-cross attention head (the authors' RCCAModule), NHWC."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from ccnet_jax.models.criss_cross import (
    AttentionFn,
    AttentionOp,
    CrissCrossAttention,
    Remat,
    check_attention_fn,
    check_remat,
)
from ccnet_jax.models.layers import ConvBN, channel_dropout, check_count, check_nhwc, check_rate, conv2d
from ccnet_jax.models.nonlocal_block import NonLocalBlock

Attention = Literal["cca", "nonlocal", "none"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)


def check_attention(attention: object, where: str) -> None:
    """A ValueError naming the choices unless `attention` is one of them."""
    if attention not in ATTENTIONS:
        raise ValueError(f"{where}: attention {attention!r} is not one of {', '.join(map(repr, ATTENTIONS))}.")


class RCCAHead(nnx.Module):
    """conva -> CCA x recurrence (shared weights) -> convb -> concat(x, .) -> bottleneck -> classifier.

    conva, convb and the bottleneck are 3x3 convs without bias, BN and leaky
    ReLU (slope 0.01); the bottleneck sees [x, convb] (in + channels) and is
    followed by Dropout2d(0.1) and a 1x1 classifier with bias.

    Args:
      in_channels: channels of the backbone features (2048).
      channels: inner width (512); CCA's queries and keys get channels // 8.
      num_classes: classifier outputs.
      recurrence: R, how many times the one CCA layer is applied (0: none;
        the layer's weights still exist, as in the authors' network).
      attention: "cca" (the paper), "nonlocal" (a NonLocalBlock in its place,
        applied once, for comparisons) or "none" (no attention module).
      dropout: rate of the channel dropout before the classifier.
      attention_fn: computes the CCA layer's attention (see `AttentionOp`).
      remat_attention: what the CCA layer recomputes in the backward: "none", "projections"
        or "all" (its `remat`).

    Input (B, H, W, in_channels); output logits (B, H, W, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 2048,
        channels: int = 512,
        num_classes: int = 19,
        *,
        recurrence: int = 2,
        attention: Attention = "cca",
        dropout: float = 0.1,
        attention_fn: AttentionFn = AttentionOp(),
        dtype: jnp.dtype | None = None,
        remat_attention: Remat = "none",
        rngs: nnx.Rngs,
    ):
        for name, count in (("in_channels", in_channels), ("channels", channels), ("num_classes", num_classes)):
            check_count(count, name, "RCCAHead")
        check_count(recurrence, "recurrence", "RCCAHead", minimum=0)
        check_attention(attention, "RCCAHead")
        check_rate(dropout, "dropout", "RCCAHead")
        # Checked whatever the attention, so that a config's typo shows before it selects "cca".
        check_remat(remat_attention, "RCCAHead: remat_attention")
        check_attention_fn(attention_fn, "RCCAHead")
        self.recurrence = recurrence
        self.attention = attention
        self.conva = ConvBN(in_channels, channels, 3, padding=1, activation="leaky_relu", dtype=dtype, rngs=rngs)
        if attention == "cca":
            self.cca = CrissCrossAttention(
                channels,
                attention_fn=attention_fn,
                dtype=dtype,
                remat=remat_attention,
                rngs=rngs,
            )
        elif attention == "nonlocal":
            self.nonlocal_block = NonLocalBlock(channels, dtype=dtype, rngs=rngs)
        self.convb = ConvBN(channels, channels, 3, padding=1, activation="leaky_relu", dtype=dtype, rngs=rngs)
        self.bottleneck = ConvBN(
            in_channels + channels, channels, 3, padding=1, activation="leaky_relu", dtype=dtype, rngs=rngs
        )
        self.dropout = channel_dropout(dropout, rngs=rngs)
        self.classifier = conv2d(channels, num_classes, 1, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.conva.conv.in_features, "RCCAHead")
        y = self.conva(x)
        if self.attention == "cca":
            for _ in range(self.recurrence):
                y = self.cca(y)
        elif self.attention == "nonlocal":
            y = self.nonlocal_block(y)
        y = self.convb(y)
        y = self.bottleneck(jnp.concatenate([x, y.astype(x.dtype)], axis=-1))
        return self.classifier(self.dropout(y))
