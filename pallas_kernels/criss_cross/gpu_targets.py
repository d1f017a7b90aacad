"""Which CUDA GPU generation the op is lowered for, and the per-block shared memory each offers.

The Triton kernels' tiling depends on it: Hopper (sm_90) multiplies with wgmma, every other
generation with mma.sync (Ampere, Ada, consumer Blackwell) or tcgen05 (data-centre Blackwell),
whose register needs differ; and a Turing GPU gives a block 64 KiB of shared memory where an
H100 gives 227 KiB.
"""

from __future__ import annotations

import re

# Compute capability (major * 10 + minor) -> the most shared memory one block may opt into, in
# bytes (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
SHARED_MEMORY_PER_BLOCK = {
    60: 48 * 1024,
    61: 48 * 1024,
    70: 96 * 1024,
    75: 64 * 1024,
    80: 163 * 1024,
    86: 99 * 1024,
    87: 163 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
    100: 227 * 1024,
    103: 227 * 1024,
    120: 99 * 1024,
    121: 99 * 1024,
}
HOPPER = 90
# The Triton kernels take bfloat16 tensor-core products, which start with Ampere; before it their
# products are emulated (4-49 KB of spills a thread compiled for sm_70 and sm_75) and some of
# their blocks need more shared memory than a Turing GPU gives (experiments/RESULTS.md).
TRITON_MIN_ARCH = 80

# Device kinds as jax reports them ("NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA GeForce RTX
# 4090"), for abstract devices, which carry no compute capability. First match wins: Turing's
# workstation cards (Quadro RTX 4000, 5000) carry numbers that later GeForce cards reuse, so the
# older brands come first, and each generation's exceptions before its rule.
_KIND_ARCH = [
    (r"\bQuadro RTX\b|\bTITAN RTX\b|\bT4G?\b|\bT\d{3,4}\b|\bRTX 20[6-8]0\b|\bGTX 16\d0\b", 75),
    (r"\bV100S?\b|\bGV100\b|\bTITAN V\b", 70),
    (r"\b(GH200|H100|H200|H800|H20)\b", 90),
    (r"\b(GB300|B300)\b", 103),
    (r"\b(GB200|B100|B200)\b", 100),
    (r"\bRTX \d+ Ada\b|\bRTX 3050 A\b|\bRTX 40[5-9]0\b|\bL4\b|\bL40S?\b|\bL20\b", 89),
    (r"\bRTX (PRO )?\d+ Blackwell\b|\bRTX 50[5-9]0\b", 120),
    (r"\bRTX 2050\b|\bRTX 30[5-9]0\b|\bRTX A\d+\b|\bA10G?\b|\bA16\b|\bA2\b|\bA40\b", 86),
    (r"\b(A100|A800|A30)\b", 80),
    (r"\bP100\b", 60),
    (r"\bP40\b|\bP4\b|\bGTX 10\d0\b|\bTITAN Xp\b|\bTITAN X \(Pascal\)|\bQuadro P\d+\b", 61),
    (r"\bTesla M\d+\b|\bGTX 9\d0\b|\bTITAN X\b|\bQuadro M\d+\b", 52),
    (r"\bTesla K80\b", 37),
    (r"\bTesla K\d+\b|\bQuadro K\d+\b", 35),
]


def cuda_arch(device_kind: str | None, compute_capability: str | None = None) -> int | None:
    """The compute capability as major * 10 + minor (80 for an A100): from the device's own
    `compute_capability` ("8.0") where it has one, else from its kind; None where neither says."""
    version = re.fullmatch(r"(\d+)\.(\d+)", compute_capability or "")
    if version:  # a ROCm device names its architecture instead ("gfx90a"), which says nothing here
        return int(version[1]) * 10 + int(version[2])
    for pattern, arch in _KIND_ARCH:
        if device_kind and re.search(pattern, device_kind):
            return arch
    return None


def shared_memory_per_block(arch: int | None) -> int:
    """Bytes of shared memory a block may use on `arch`; for an unknown GPU, the least that any
    generation from Ampere on gives (99 KiB)."""
    return SHARED_MEMORY_PER_BLOCK.get(arch, 99 * 1024)
