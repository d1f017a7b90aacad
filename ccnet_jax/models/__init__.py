"""CCNet in Flax NNX (and a Linen criss-cross attention), NHWC throughout.

Importable with jax and flax alone: no data or training dependencies.
"""

from ccnet_jax.models.aux_head import AuxHead
from ccnet_jax.models.ccnet import CCNet, CCNetConfig
from ccnet_jax.models.criss_cross import AttentionOp, CrissCrossAttention
from ccnet_jax.models.layers import ConvBN, batch_norm, conv2d, max_pool2d
from ccnet_jax.models.nonlocal_block import NonLocalBlock
from ccnet_jax.models.rcca_head import RCCAHead
from ccnet_jax.models.resnet import Bottleneck, ResNet, ResNetConfig

__all__ = [
    "AttentionOp",
    "AuxHead",
    "Bottleneck",
    "CCNet",
    "CCNetConfig",
    "ConvBN",
    "CrissCrossAttention",
    "NonLocalBlock",
    "RCCAHead",
    "ResNet",
    "ResNetConfig",
    "batch_norm",
    "conv2d",
    "max_pool2d",
]
