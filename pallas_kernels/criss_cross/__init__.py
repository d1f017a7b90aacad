"""Criss-cross attention: the op, its jnp reference and the Pallas kernel tiling."""

from pallas_kernels.criss_cross.api import criss_cross_attention, sharded_criss_cross_attention
from pallas_kernels.criss_cross.config import CrissCrossConfig, MosaicConfig, XlaConfig, default_config
from pallas_kernels.criss_cross.reference import (
    criss_cross_attention_map,
    criss_cross_attention_reference,
)

__all__ = [
    "CrissCrossConfig",
    "MosaicConfig",
    "XlaConfig",
    "criss_cross_attention",
    "criss_cross_attention_map",
    "criss_cross_attention_reference",
    "default_config",
    "sharded_criss_cross_attention",
]
