"""Which GPU generation an op is lowered for, and the tiling the Triton kernels take on it."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import criss_cross_attention, default_config
from pallas_kernels.criss_cross import implementations, testing
from pallas_kernels.criss_cross.gpu_targets import cuda_arch, shared_memory_per_block
from pallas_kernels.criss_cross.implementations import LoweringTarget, choose, lowering_target
from pallas_kernels.criss_cross.triton_resources import capture_triton_kernels, export_for_cuda


@pytest.mark.parametrize("kind,arch", [
    ("NVIDIA H100 80GB HBM3", 90), ("NVIDIA H200", 90), ("NVIDIA GH200 480GB", 90), ("NVIDIA H20", 90),
    ("NVIDIA B200", 100), ("NVIDIA GeForce RTX 5090", 120), ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 120),
    ("NVIDIA L4", 89), ("NVIDIA L40S", 89), ("NVIDIA GeForce RTX 4090", 89), ("NVIDIA RTX 6000 Ada Generation", 89),
    ("NVIDIA A10G", 86), ("NVIDIA A10", 86), ("NVIDIA RTX A6000", 86), ("NVIDIA RTX A3000 Laptop GPU", 86),
    ("NVIDIA GeForce RTX 3090", 86), ("NVIDIA A40", 86),
    ("NVIDIA A100-SXM4-80GB", 80), ("NVIDIA A100 80GB PCIe", 80), ("NVIDIA A30", 80),
    ("Tesla T4", 75), ("NVIDIA GeForce RTX 2080 Ti", 75), ("Tesla V100-SXM2-16GB", 70), ("Tesla P100-PCIE-16GB", 60),
    ("NVIDIA Z9000", None), ("cpu", None),
    # Names that later cards reuse, or that break their generation's pattern.
    ("Quadro RTX 5000", 75), ("Quadro RTX 4000", 75), ("NVIDIA T1000", 75), ("NVIDIA RTX 5000 Ada Generation", 89),
    ("NVIDIA GeForce RTX 3050 A Laptop GPU", 89), ("NVIDIA GeForce RTX 2050", 86), ("Tesla V100S-PCIE-32GB", 70),
    ("Quadro GV100", 70), ("NVIDIA B300", 103), ("NVIDIA TITAN Xp", 61), ("Tesla M60", 52), ("Tesla K80", 37),
])
def test_generation_from_the_device_kind(kind, arch):
    assert cuda_arch(kind) == arch


def test_the_device_s_own_compute_capability_comes_first():
    assert cuda_arch("NVIDIA Z9000", "12.1") == 121
    assert cuda_arch("Tesla T4", "8.0") == 80
    assert cuda_arch("NVIDIA A100-SXM4-80GB", "gfx90a") == 80


def test_shared_memory_per_block_by_generation():
    assert shared_memory_per_block(90) == 227 * 1024
    assert shared_memory_per_block(80) == 163 * 1024
    assert shared_memory_per_block(75) == 64 * 1024
    assert shared_memory_per_block(None) == shared_memory_per_block(86) == 99 * 1024


def test_a_concrete_array_answers_for_its_device():
    target = lowering_target(jnp.zeros(3))
    device = jax.devices()[0]
    assert target.device_kind == device.device_kind
    if device.platform == "gpu":
        assert target.on_cuda and target.arch == cuda_arch(None, device.compute_capability)
    else:
        assert not target.on_cuda and target.arch is None


def _kernel_warps(device_kind: str, shape, dtype) -> dict[str, int]:
    b, h, w, cqk, cv = shape

    def f(q, k, v, g):
        out, vjp = jax.vjp(lambda *a: criss_cross_attention(*a, implementation="triton"), q, k, v)
        return out, vjp(g)

    args = [jax.ShapeDtypeStruct((b, h, w, c), dtype) for c in (cqk, cqk, cv, cv)]
    return {kernel.name: kernel.num_warps for kernel in capture_triton_kernels(f, args, device_kind)}


def test_the_op_tiles_for_the_gpu_it_is_lowered_for():
    # The same call, lowered under an abstract A100 and an abstract H100, carries each one's
    # default tiling (the forward's warps tell them apart at 128x256).
    shape = (1, 128, 256, 64, 512)
    for kind, arch in (("NVIDIA A100-SXM4-80GB", 80), ("NVIDIA H100 80GB HBM3", 90)):
        config = default_config(*shape[1:], 2, arch)
        warps = _kernel_warps(kind, shape, jnp.bfloat16)
        assert warps["criss_cross_fwd_row"] == config.fwd_num_warps
        assert warps["criss_cross_bwd_dkq_row"] == config.bwd_num_warps
    assert default_config(*shape[1:], 2, 80).fwd_num_warps != default_config(*shape[1:], 2, 90).fwd_num_warps


def test_an_old_gpu_gets_xla_and_no_triton_kernel():
    def f(q, k, v):
        return criss_cross_attention(q, k, v)

    args = [jax.ShapeDtypeStruct((1, 9, 17, c), jnp.float16) for c in (16, 16, 32)]
    text = export_for_cuda(f, args, "Tesla T4").mlir_module()
    assert "stablehlo.custom_call" not in text and "stablehlo.dot_general" in text


def test_an_abstract_mirror_of_this_process_s_gpu_takes_its_compute_capability(monkeypatch):
    # shard_map traces under an abstract mesh mirroring the real devices, which keeps only their
    # kind: a kind that is this process's GPU's takes that GPU's compute capability, not the table's.
    class Gpu:
        device_kind, compute_capability, platform = "NVIDIA Z9000", "8.9", "gpu"

    monkeypatch.setattr(implementations.jax, "devices", lambda *args: [Gpu()])
    seen = []

    def f(x):
        seen.append(lowering_target(x))
        return x

    for kind in ("NVIDIA Z9000", "NVIDIA A100-SXM4-80GB", "NVIDIA Y1"):
        export_for_cuda(f, [jax.ShapeDtypeStruct((2,), jnp.float32)], kind)
    assert [(target.on_cuda, target.arch) for target in seen] == [(True, 89), (True, 80), (True, None)]
    # An AMD GPU, whose compute capability is an architecture name, is no CUDA target.
    Gpu.device_kind, Gpu.compute_capability = "AMD Instinct MI300X", "gfx942"
    export_for_cuda(f, [jax.ShapeDtypeStruct((2,), jnp.float32)], "AMD Instinct MI300X")
    assert (seen[-1].on_cuda, seen[-1].arch) == (False, None)


def test_mosaic_on_an_old_gpu_names_what_runs_there():
    target = LoweringTarget(True, "Tesla T4", 75)
    with pytest.raises(ValueError, match="needs a Hopper GPU") as error:
        choose("mosaic", dtype=jnp.float16, h=9, w=9, cqk=8, target=target, interpret=False)
    assert "'triton'" not in str(error.value) and "implementation='xla'" in str(error.value)


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16],
                         ids=lambda d: jnp.dtype(d).name)
def test_the_tiling_of_other_generations_computes_the_op(dtype):
    # The Pallas interpreter runs Hopper's tiling unless told otherwise; this runs Ampere's (the
    # same for every generation but Hopper) on a map long enough for several 32-pixel blocks and
    # 16-channel dP tiles, against the float64 reference.
    b, h, w, cqk, cv = 1, 33, 70, 24, 40
    config = default_config(h, w, cqk, cv, jnp.dtype(dtype).itemsize, 80)
    q, k, v, g = testing.random_inputs(5, b, h, w, cqk, cv, dtype)
    out, vjp = jax.vjp(lambda *a: criss_cross_attention(*a, implementation="triton", interpret=True, config=config),
                       q, k, v)
    tol = testing.tolerance(dtype, h + w + max(cqk, cv))
    assert testing.relative_error(out, testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", vjp(g), testing.dense_vjp(q, k, v, g)):
        assert testing.relative_error(grad, ref) < tol, f"d{name}"
