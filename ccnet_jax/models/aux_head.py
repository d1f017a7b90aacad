"""The auxiliary (deep supervision, "dsn") head on layer3, NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccnet_jax.models.layers import ConvBN, channel_dropout, check_count, check_nhwc, check_rate, conv2d


class AuxHead(nnx.Module):
    """3x3 conv (with bias) + BN + leaky ReLU, Dropout2d, 1x1 classifier.

    Input (B, H, W, in_channels) layer3 features (1024); output logits
    (B, H, W, num_classes). The authors weigh its loss by 0.4.
    """

    def __init__(
        self,
        in_channels: int = 1024,
        channels: int = 512,
        num_classes: int = 19,
        *,
        dropout: float = 0.1,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        for name, count in (("in_channels", in_channels), ("channels", channels), ("num_classes", num_classes)):
            check_count(count, name, "AuxHead")
        check_rate(dropout, "dropout", "AuxHead")
        self.conv_bn = ConvBN(
            in_channels, channels, 3, padding=1, use_bias=True, activation="leaky_relu", dtype=dtype, rngs=rngs
        )
        self.dropout = channel_dropout(dropout, rngs=rngs)
        self.classifier = conv2d(channels, num_classes, 1, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.conv_bn.conv.in_features, "AuxHead")
        return self.classifier(self.dropout(self.conv_bn(x)))
