"""How the attention tests call each implementation."""

from __future__ import annotations

from pallas_kernels.criss_cross.testing import SMALL_BLOCKS


def op_kwargs(implementation: str) -> dict:
    if implementation == "triton":
        return {"implementation": "triton", "interpret": True, "config": SMALL_BLOCKS}
    if implementation == "mosaic":  # the Mosaic GPU interpreter
        return {"implementation": "mosaic", "interpret": True}
    return {"implementation": implementation}
