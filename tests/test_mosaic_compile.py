"""The Mosaic GPU kernels compiled for an H100 (sm_90a) without a GPU: registers and spills.

jax's CUDA plugin compiles through a compile-only H100 topology down to ptxas
(pallas_kernels/criss_cross/h100_target.py, mosaic_resources.py). The plugin stays out of the
project's environment (without a GPU it reports a configuration error at every jax
start-up): .ci/run installs it into .sm90 and runs this file with PYTHONPATH=.sm90.
Elsewhere the compiling tests skip and say what they need; the parsing test always runs.
"""

import shutil

import pytest

from pallas_kernels.criss_cross.h100_target import cuda_plugin_installed
from pallas_kernels.criss_cross.mosaic_layout import QUERY_BLOCK, round_up
from pallas_kernels.criss_cross.mosaic_resources import (
    MosaicKernelResources,
    mosaic_kernel_ptx,
    mosaic_kernel_resources,
    parse_ptxas,
)

needs_compiler = pytest.mark.skipif(
    not (cuda_plugin_installed() and shutil.which("ptxas")),
    reason="compiling for sm_90a needs jax's CUDA plugin (pip install --target .sm90 jax-cuda13-plugin==0.11.2, "
    "then PYTHONPATH=.sm90) and ptxas on the PATH; no GPU is needed",
)

_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'criss_cross_mosaic_fwd_row_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for criss_cross_mosaic_fwd_row_mosaic_gpu_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem
ptxas info    : Function properties for some_xla_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers
ptxas warning : Registers are spilled to local memory in function 'criss_cross_mosaic_bwd_col_mosaic_gpu_kernel', \
32 bytes spill stores, 88 bytes spill loads
ptxas info    : Compiling entry function 'criss_cross_mosaic_bwd_col_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for criss_cross_mosaic_bwd_col_mosaic_gpu_kernel
    32 bytes stack frame, 32 bytes spill stores, 88 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 32 bytes cumulative stack size, 1 bytes smem
"""


def test_ptxas_report_is_read_per_mosaic_kernel():
    assert parse_ptxas(_LOG) == [
        MosaicKernelResources("criss_cross_mosaic_fwd_row", 168, 0, 0),
        MosaicKernelResources("criss_cross_mosaic_bwd_col", 168, 32, 88),
    ]


# Shape -> Mosaic kernels: two forward passes, then per direction one backward kernel (strips up to
# 128 pixels) or a query-side and a key-side one. At (1,128,256) the one-CTA backward of the
# 128-pixel columns spilled 32/88 bytes while it kept P in registers through its channel loop.
@needs_compiler
@pytest.mark.parametrize(
    "shape,kernels",
    [((2, 97, 97, 64, 512), 4), ((1, 128, 256, 64, 512), 5), ((1, 256, 256, 64, 512), 6)],
    ids=str,
)
def test_every_kernel_compiles_for_sm90a_without_spilling(shape, kernels):
    compiled = mosaic_kernel_resources(shape)
    assert len(compiled) == kernels, compiled
    assert [k for k in compiled if k.spill_store_bytes or k.spill_load_bytes] == []


# float32: forward and backward on float16 pairs, one warpgroup a CTA and three wgmmas a product;
# per direction a query-side and a key-side backward kernel. On 2026-11-28: 186-224 registers in
# the forward, 158-211 in the query side, 236-242 in the key side, whose channel loop spilled
# (88-132 bytes) while it was unrolled.
@needs_compiler
@pytest.mark.parametrize("shape", [(2, 97, 97, 64, 512), (1, 128, 128, 64, 512)], ids=str)
def test_float32_kernels_compile_for_sm90a_without_spilling(shape):
    compiled = mosaic_kernel_resources(shape, "float32")
    assert sorted(k.name for k in compiled) == sorted(
        [f"criss_cross_mosaic_fwd_{d}" for d in ("row", "col")]
        + [f"criss_cross_mosaic_bwd_f32_{side}_{d}" for side in ("query_side", "key_side") for d in ("row", "col")])
    assert [k for k in compiled if k.spill_store_bytes or k.spill_load_bytes] == []


# The persistent forward (one CTA per SM looping over the strips) holds the loop's indices beside
# the one-CTA-per-item forward's registers. At 256-pixel rows its row pass spilled 60 bytes until
# 2026-11-28, when the scores' exponentials became ex2 alone (mosaic_tiles.exp_of_difference): 214
# registers since. (At 256x256 its column pass still spills 52/56 bytes, 124/128 before:
# experiments/mosaic_resources.py --configs persistent.)
@needs_compiler
@pytest.mark.parametrize(
    "shape,config",
    [((2, 97, 97, 64, 512), {"persistent": True}), ((2, 97, 97, 64, 512), {"persistent": True, "value_splits": 2}),
     ((1, 128, 256, 64, 512), {"persistent": True})],
    ids=str,
)
def test_persistent_forward_compiles_for_sm90a_without_spilling(shape, config):
    compiled = mosaic_kernel_resources(shape, config=config, backward=False)
    assert sorted(k.name for k in compiled) == ["criss_cross_mosaic_fwd_col", "criss_cross_mosaic_fwd_row"]
    assert [k for k in compiled if k.spill_store_bytes or k.spill_load_bytes] == []


# The forward's softmax takes one exponential per score: P = exp(S - m)·exp(m - lse) from the
# exponentials its sum took. Until 2026-11-28 it took exp(S - lse) after the sum, a second one:
# 108 and 114 ex2 a thread in the row and column passes at 97 pixels, against 56 and 62 since.
# On an H100 the special-function units give 16 a clock per SM (FlashAttention-3's 3.9 TFLOPS
# of them on an H100 SXM5), beside 64 scores a thread of 128 per warpgroup at 97 pixels.
@needs_compiler
@pytest.mark.parametrize("config", [{}, {"persistent": True}], ids=str)
def test_forward_takes_one_exponential_per_score(config):
    pixels = 97
    scores_per_thread = QUERY_BLOCK * round_up(pixels, QUERY_BLOCK) // 128
    ptx = mosaic_kernel_ptx((2, pixels, pixels, 64, 512), config=config, backward=False)
    assert sorted(ptx) == ["criss_cross_mosaic_fwd_col", "criss_cross_mosaic_fwd_row"]
    for name, text in ptx.items():
        exponentials = text.count("ex2.approx")
        # A few more per query row: the row's lse and, in the column pass, its merge with the row's.
        assert 0 < exponentials <= scores_per_thread + 16, (name, exponentials)


# Each score's exponential is exp2((s - shift)·log2(e)): an ex2 after a subtraction and a
# multiplication (mosaic_tiles.exp_of_difference). jnp.exp lowers to libdevice's expf, whose range
# reduction (an fma.rm, a cvt.sat and about six more) came with every one: 52-62 fma.rm a thread
# in each kernel at 97 pixels until 2026-11-28. What is left is per query row (lse, merges).
@needs_compiler
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_scores_exponentials_skip_libdevice_range_reduction(dtype):
    ptx = mosaic_kernel_ptx((2, 97, 97, 64, 512), dtype)
    assert len(ptx) == (4 if dtype == "bfloat16" else 6), sorted(ptx)
    for name, text in ptx.items():
        assert text.count("fma.rm.f32") <= 8, (name, text.count("fma.rm.f32"))
        assert text.count("ex2.approx") >= 32, (name, text.count("ex2.approx"))
