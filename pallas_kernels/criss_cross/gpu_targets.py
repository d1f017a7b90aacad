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
# products are emulated (10-50 KB of spills a thread compiled for sm_70 and sm_75) and their
# blocks need more shared memory than a Turing GPU gives (experiments/RESULTS.md).
TRITON_MIN_ARCH = 80

# Device kinds as jax reports them ("NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA GeForce RTX
# 4090"), for abstract devices, which carry no compute capability. First match wins.
_KIND_ARCH = [
    (r"\b(GH200|H100|H200|H800|H20)\b", 90),
    (r"\b(GB200|GB300|B100|B200|B300)\b", 100),
    (r"\bRTX (PRO )?\d+ Blackwell\b|\bRTX 50\d0\b", 120),
    (r"\bRTX 40\d0\b|\bRTX \d+ Ada\b|\bL4\b|\bL40S?\b|\bL20\b", 89),
    (r"\bRTX 30\d0\b|\bRTX A\d+\b|\bA10G?\b|\bA16\b|\bA2\b|\bA40\b", 86),
    (r"\b(A100|A800|A30)\b", 80),
    (r"\bT4\b|\bRTX 20\d0\b|\bQuadro RTX\b|\bTITAN RTX\b|\bGTX 16\d0\b", 75),
    (r"\bV100\b|\bTITAN V\b", 70),
    (r"\bP100\b", 60),
    (r"\bP40\b|\bP4\b|\bGTX 10\d0\b", 61),
]


def cuda_arch(device_kind: str | None, compute_capability: str | None = None) -> int | None:
    """The compute capability as major * 10 + minor (80 for an A100): from the device's own
    `compute_capability` ("8.0") where it has one, else from its kind; None where neither says."""
    if compute_capability:
        major, minor = compute_capability.split(".")[:2]
        return int(major) * 10 + int(minor)
    for pattern, arch in _KIND_ARCH:
        if device_kind and re.search(pattern, device_kind):
            return arch
    return None


def shared_memory_per_block(arch: int | None) -> int:
    """Bytes of shared memory a block may use on `arch`; for an unknown GPU, the least that any
    generation from Ampere on gives (99 KiB)."""
    return SHARED_MEMORY_PER_BLOCK.get(arch, 99 * 1024)
