"""Pallas GPU kernels for ccnet-jax. Importable with jax alone."""

from pallas_kernels.criss_cross import (
    CrissCrossConfig,
    MosaicConfig,
    XlaConfig,
    criss_cross_attention,
    criss_cross_attention_map,
    criss_cross_attention_reference,
    default_config,
    sharded_criss_cross_attention,
)
from pallas_kernels.criss_cross.implementations import IMPLEMENTATIONS

__all__ = [
    "IMPLEMENTATIONS",
    "CrissCrossConfig",
    "MosaicConfig",
    "XlaConfig",
    "criss_cross_attention",
    "criss_cross_attention_map",
    "criss_cross_attention_reference",
    "default_config",
    "sharded_criss_cross_attention",
]
