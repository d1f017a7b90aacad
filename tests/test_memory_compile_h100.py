"""Memory compiled for an H100 without a GPU: RCCA against a non-local block
(experiments/nonlocal_vs_rcca.py --h100: XLA's training peak for every variant, the fused kernels
included), and the attention op's own temporaries (experiments/attention_memory_h100.py).

Needs jax's CUDA plugin in .sm90 (as tests/test_mosaic_compile.py; .ci/run installs it); skips
without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pallas_kernels.criss_cross.h100_target import cuda_plugin_installed

pytestmark = pytest.mark.skipif(
    not cuda_plugin_installed(),
    reason="compiling for an H100 needs jax's CUDA plugin (pip install --target .sm90 jax-cuda13-plugin==0.11.2, "
    "then PYTHONPATH=.sm90); no GPU is needed",
)

VARIANTS = ["baseline", "R=2", "R=2 triton", "R=2 triton remat", "R=2 triton remat all", "non-local"]
MIB = 2**20


def _script(*args: str) -> str:
    """The script's stdout, run from the repository root with jax free to register the CUDA plugin."""
    done = subprocess.run([sys.executable, *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, check=False, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_variant_compiles_for_h100_and_recomputing_lowers_the_training_peak():
    # The RCCA head alone on CCNet's 97x97x2048 features (the same increments as the whole network,
    # in seconds rather than minutes). Without --h100 the fused rows would read n/a on a CPU.
    out = _script("experiments/nonlocal_vs_rcca.py", "--scope", "head", "--h100", "--markdown",
                  "--variants", ",".join(VARIANTS))
    header, _, *rows = [line for line in out.splitlines() if line.startswith("|")]
    column = [cell.strip() for cell in header.split("|")].index("train +XLA peak MiB")
    peak = {cells[1]: float(cells[column]) for cells in ([c.strip() for c in row.split("|")] for row in rows)
            if not cells[1].startswith("baseline")}
    assert set(peak) == set(VARIANTS) - {"baseline"}, out
    # Each level of recomputation keeps less; the fused op keeps less than the xla op's maps; a
    # non-local block's (H·W)² energies dwarf them all, by more than the paper's 11x from "projections" on.
    assert peak["R=2 triton remat all"] < peak["R=2 triton remat"] < peak["R=2 triton"] < peak["R=2"]
    assert peak["non-local"] > 11 * peak["R=2 triton remat"]


def test_the_fused_kernels_hold_no_map_twice():
    # CCNet's training shape. The second direction's kernels write over the first's results (the
    # row output, dK, dV, and for Mosaic dQ), so the forward+backward holds no (B, H, W, Cv) map
    # beyond its arguments and outputs. Mosaic float32 holds the float16 pairs of q and k (as many
    # bytes as those maps); its kernels split V's and dO's tiles themselves. Written to separate
    # buffers they held 23.2 (Mosaic) and 18.4 MiB (Triton) in bfloat16; with XLA splitting v and
    # dO too, Mosaic float32 held 83.1 MiB, and 119.8 before that.
    b, h, w, cqk, cv = 2, 97, 97, 64, 512
    out = _script("experiments/attention_memory_h100.py", "--shapes", f"{b},{h},{w},{cqk},{cv}",
                  "--implementations", "mosaic", "triton")
    rows = [line.split()[5:] for line in out.splitlines() if line.startswith("(2, 97, 97, 64, 512)")]
    temp = {(dtype, impl): float(fwd_bwd) for dtype, impl, _, fwd_bwd, _ in rows}
    assert set(temp) == {(d, i) for d in ("bfloat16", "float32") for i in ("mosaic", "triton")}, out
    bf16_map = b * h * w * cv * 2 / MIB
    assert temp["bfloat16", "mosaic"] < bf16_map / 10, out
    assert temp["bfloat16", "triton"] < bf16_map / 10, out
    qk_pairs = b * h * w * 2 * cqk * 4 / MIB
    assert temp["float32", "mosaic"] < qk_pairs + bf16_map / 10, out
