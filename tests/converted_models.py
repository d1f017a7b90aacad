"""Small CCNets as `ccnet convert` folders, from random PyTorch-named weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.convert import inplace_abn_scale


def converted_tiny_ccnet(folder: Path, *, num_classes: int = ref.TINY_CLASSES, seed: int = 0) -> Path:
    """`folder`/converted: the tiny CCNet (width 4, one block a stage) with `num_classes` classes."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = ref.random_state_dict(ref.authors_shapes(ref.TINY_WIDTH, ref.TINY_BLOCKS, num_classes), seed=seed)
    np.savez(folder / "ccnet.npz", **sd)
    assert cli_main(["convert", str(folder / "ccnet.npz"), str(folder / "converted")]) == 0
    return folder / "converted"


def as_converted(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `ccnet convert --format authors` stores for these PyTorch weights, under the same names
    (float32, BatchNorm weights as InPlaceABN's scale |weight| + 1e-5)."""
    out = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        if name.endswith(".weight") and name[: -len("weight")] + "running_mean" in state_dict:
            value = inplace_abn_scale(value)
        out[name] = value
    return out
