"""The Pallas path lowers for CUDA at the CCNet shapes, on a machine without a GPU.

Lowering runs the Pallas -> Triton translation against an abstract
H100, which catches non-power-of-two tiles and unsupported primitives. With
the `triton` package, the captured kernels are also compiled for sm_90 to
check that their shared memory fits an H100 block, and with each other
generation's tiling for that generation.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import CrissCrossConfig, XlaConfig, criss_cross_attention, default_config
from pallas_kernels.criss_cross.config import H100_SHARED_MEMORY_BYTES
from pallas_kernels.criss_cross.gpu_targets import shared_memory_per_block
from pallas_kernels.criss_cross.triton_resources import capture_triton_kernels, export_for_cuda

TRAIN = (2, 97, 97, 64, 512)
EVAL = (1, 128, 256, 64, 512)
WHOLE_IMAGE = (1, 129, 257, 64, 512)  # a 1024x2048 Cityscapes image at stride 8
KERNELS = [  # in program order
    "criss_cross_fwd_row",
    "criss_cross_fwd_col",
    "criss_cross_bwd_dv_row",
    "criss_cross_bwd_dv_col",
    "criss_cross_bwd_dkq_row",
    "criss_cross_bwd_dkq_col",
]


def _forward_backward(implementation, config=None):
    def f(q, k, v, g):
        out, vjp = jax.vjp(
            lambda q, k, v: criss_cross_attention(q, k, v, implementation=implementation, config=config), q, k, v
        )
        return out, vjp(g)

    return f


def _args(shape, dtype):
    b, h, w, cqk, cv = shape
    return [jax.ShapeDtypeStruct((b, h, w, c), dtype) for c in (cqk, cqk, cv, cv)]


def _export_text(implementation, shape, dtype) -> str:
    return export_for_cuda(_forward_backward(implementation), _args(shape, dtype)).mlir_module()


def _energy_shaped_tensors(text: str, shape) -> set[str]:
    """Tensor types in the module whose trailing dims are (H, W, H), (H, W, W) or (H, W, H+W)."""
    _, h, w, _, _ = shape
    energy_tails = {f"{h}x{w}x{n}" for n in (h, w, h + w)}
    types = set(re.findall(r"tensor<([0-9x]+)x(?:f32|bf16|f16)>", text))
    return {t for t in types if any(t.endswith(tail) for tail in energy_tails)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [TRAIN, EVAL], ids=["train_2x97x97", "eval_1x128x256"])
def test_forward_and_backward_lower_for_cuda(shape, dtype):
    text = _export_text("triton", shape, dtype)
    names = re.findall(r'name = "(criss_cross_[a-z_]+)"', text)
    assert sorted(names) == sorted(KERNELS)
    # The energies never exist outside the kernels' registers.
    assert not _energy_shaped_tensors(text, shape)


def test_energy_check_sees_the_xla_energies():
    # The check above is meaningful: the xla path does materialise them.
    assert _energy_shaped_tensors(_export_text("xla", TRAIN, jnp.float32), TRAIN)


def _dots(float32_dot: str | None) -> dict[str, list[str]]:
    """Each float32 kernel's tt.dot ops (at a small shape), with the given float32 products (None:
    the default tiling's)."""
    b, h, w, cqk, cv = 1, 33, 65, 5, 7
    config = default_config(h, w, cqk, cv, 4)
    if float32_dot is not None:
        config = dataclasses.replace(config, float32_dot=float32_dot)
    kernels = capture_triton_kernels(_forward_backward("triton", config), _args((b, h, w, cqk, cv), jnp.float32))
    return {kernel.name: re.findall(r"tt\.dot [^\n]*", kernel.ir) for kernel in kernels}


def test_float32_as_bf16x6_makes_six_bfloat16_products_of_each_tf32x3_one():
    tf32x3, bf16x6 = _dots("tf32x3"), _dots("bf16x6")
    assert list(bf16x6) == KERNELS
    for name, dots in bf16x6.items():
        assert all("inputPrecision = tf32x3" in dot for dot in tf32x3[name]), name
        assert len(dots) == 6 * len(tf32x3[name]), name
        assert all("xbf16>" in dot and "tf32" not in dot for dot in dots), name
    # bf16x6 is the default: 11% faster than TF32x3 forward+backward on an H100, as accurate.
    assert _dots(None) == bf16x6


def test_float32_as_f16x3_makes_three_float16_products_of_each_tf32x3_one():
    tf32x3, f16x3 = _dots("tf32x3"), _dots("f16x3")
    assert list(f16x3) == KERNELS
    for name, dots in f16x3.items():
        assert len(dots) == 3 * len(tf32x3[name]), name
        # (Their inputPrecision attribute, if any, applies to float32 operands only.)
        assert all(re.search(r": tensor<\d+x\d+xf16> \* tensor<\d+x\d+xf16> -> tensor<\d+x\d+xf32>", dot)
                   for dot in dots), name


@pytest.mark.parametrize(
    "config,dtype,six",
    [
        (None, jnp.float32, False),
        (XlaConfig(), jnp.float32, False),
        (CrissCrossConfig(), jnp.float32, False),  # a kernel config is left unused where xla runs
        (XlaConfig("bf16x6"), jnp.float32, True),
        (XlaConfig("bf16x6"), jnp.bfloat16, False),  # 16-bit inputs keep exact products
    ],
    ids=["none", "exact", "kernel_config", "bf16x6", "bf16x6_bfloat16"],
)
def test_xla_config_sets_every_float32_product_forward_and_backward(config, dtype, six):
    # The CPU multiplies bf16x6 exactly, so what reaches a GPU is checked in the exported program.
    text = export_for_cuda(_forward_backward("xla", config), _args((1, 5, 6, 3, 4), dtype)).mlir_module()
    dots = re.findall(r"stablehlo\.dot_general [^\n]*", text)
    assert len(dots) == 12  # 4 products in the forward, 2 gradient products of each in the backward
    if six:
        parts = "lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32"
        assert all(parts in dot and "num_primitive_operations = 6" in dot for dot in dots)
    else:
        assert all("precision = [HIGHEST, HIGHEST]" in dot for dot in dots)


def test_captured_kernels_carry_the_config():
    b, h, w, cqk, cv = TRAIN
    config = default_config(h, w, cqk, cv, 2)
    kernels = capture_triton_kernels(_forward_backward("triton"), _args(TRAIN, jnp.bfloat16))
    assert [k.name for k in kernels] == KERNELS
    for kernel in kernels:
        assert kernel.ir.startswith("module")
        warps = config.fwd_num_warps if "fwd" in kernel.name else config.bwd_num_warps
        assert kernel.num_warps == warps
    # Grid of the row forward: B·H strips x query blocks x Cv tiles, over 3 launch dims.
    fwd_row = kernels[0]
    q_blocks = -(-w // config.block_q)
    cv_tiles = -(-cv // config.block_cv)
    assert fwd_row.grid[0] * fwd_row.grid[1] * fwd_row.grid[2] == b * h * q_blocks * cv_tiles


@pytest.mark.parametrize("shape", [TRAIN, EVAL], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_kernels_fit_h100_shared_memory_without_spilling(dtype, shape):
    pytest.importorskip("triton", reason="compiling for sm_90 on CPU needs the triton package")
    from pallas_kernels.criss_cross.triton_resources import compile_for_gpu

    # The default tilings were chosen so that nothing spills at CCNet's maps; in float32 that
    # takes one backward stage at 97x97 and two at 128x256 (experiments/kernel_resources.py).
    for kernel in capture_triton_kernels(_forward_backward("triton"), _args(shape, dtype)):
        resources = compile_for_gpu(kernel)
        assert 0 < resources.shared_memory_bytes <= H100_SHARED_MEMORY_BYTES, resources
        assert resources.spill_stack_bytes == 0, resources


@pytest.mark.parametrize("shape", [TRAIN, EVAL, WHOLE_IMAGE], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_other_gpus_get_a_tiling_that_fits_them_without_spilling(dtype, shape):
    pytest.importorskip("triton", reason="compiling for CUDA GPUs on CPU needs the triton package")
    from pallas_kernels.criss_cross.triton_resources import compile_for_gpu

    # Hopper's tiling spills there (16-540 bytes a thread, experiments/RESULTS.md); each of these
    # generations gets its own, sized so that nothing spills at CCNet's maps: Ampere (sm_80, and
    # sm_86 for the A10 and RTX 30 cards), Ada (sm_89), data-centre and consumer Blackwell (sm_100,
    # sm_120; the first multiplies 16-bit tiles with tcgen05).
    b, h, w, cqk, cv = shape
    for arch in (80, 86, 89, 100, 120):
        config = default_config(h, w, cqk, cv, jnp.dtype(dtype).itemsize, arch)
        kernels = capture_triton_kernels(_forward_backward("triton", config), _args(shape, dtype))
        assert [kernel.name for kernel in kernels] == KERNELS
        for kernel in kernels:
            resources = compile_for_gpu(kernel, arch)
            assert 0 < resources.shared_memory_bytes <= shared_memory_per_block(arch), (arch, resources)
            assert resources.spill_stack_bytes == 0, (arch, resources)
            # Tensor-core products, and no Hopper instruction.
            assert resources.mma_sync + resources.tcgen05 > 0 and resources.wgmma == 0, (arch, resources)


def _dq_partial_sums(text: str, shape) -> set[str]:
    """float32 (P, B, H, W, Cqk) tensors: the dK/dQ kernel's per-key-block dQ partial sums."""
    b, h, w, cqk, _ = shape
    return set(re.findall(rf"tensor<(\d+x{b}x{h}x{w}x{cqk})xf32>", text))


def test_16_bit_ccnet_training_strips_need_no_dq_partial_sums():
    # The default tiling holds a whole 97-pixel strip in the dK/dQ kernel, which then writes dQ
    # itself; strips of 256 pixels still span two key blocks, and so partial sums, which shows
    # that the check sees them.
    assert not _dq_partial_sums(_export_text("triton", TRAIN, jnp.bfloat16), TRAIN)
    assert _dq_partial_sums(_export_text("triton", EVAL, jnp.bfloat16), EVAL)
