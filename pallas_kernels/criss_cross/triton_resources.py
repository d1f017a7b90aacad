"""What the kernels cost a Hopper GPU, found on a machine without one.

`capture_triton_kernels` lowers a function for CUDA against an abstract H100
(no GPU needed) and pulls out the Triton IR of every pallas_call; with the
`triton` package installed, `compile_for_gpu` compiles that IR for sm_90 and
reads the compiler's resource report: registers, spill stack, shared memory.
XLA compiles the same IR with the Triton bundled in jaxlib, whose version
differs from the package's, so the figures are a close estimate, not a promise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import jax

H100 = "NVIDIA H100 80GB HBM3"
_TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One pallas_call as XLA would launch it."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    ir: str  # Triton dialect, textual MLIR


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int  # per thread
    spill_stack_bytes: int  # per thread; > 0 means registers spilled to local memory
    shared_memory_bytes: int  # per block, dynamic (Triton's pipeline buffers)
    num_warps: int
    num_stages: int
    wgmma: int  # Hopper warpgroup matrix instructions in the PTX (wgmma.mma_async)
    mma_sync: int  # older per-warp matrix instructions (mma.sync), the Ampere path
    tcgen05: int  # data-centre Blackwell's (sm_100) tensor-memory matrix instructions (tcgen05.mma)


def _abstract_gpu_mesh(device_kind: str):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def export_for_cuda(
    fn: Callable, args: Sequence[jax.ShapeDtypeStruct], device_kind: str = H100
) -> jax.export.Exported:
    """jit(fn)(*args) lowered for CUDA against an abstract GPU (an AbstractMesh whose AbstractDevice is
    the GPU), on any machine: it runs the Pallas -> Triton translation but compiles nothing."""
    with jax.sharding.use_abstract_mesh(_abstract_gpu_mesh(device_kind)):
        return jax.export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
        )(*args)


def capture_triton_kernels(
    fn: Callable, args: Sequence[jax.ShapeDtypeStruct], device_kind: str = H100
) -> list[TritonKernel]:
    """Lowers jit(fn)(*args) for CUDA and returns its Triton kernels in program order."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    exported = export_for_cuda(fn, args, device_kind)

    configs = []
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())

        def visit(op):
            if op.name == "stablehlo.custom_call":
                target = ir.StringAttr(op.attributes["call_target_name"]).value
                if target == _TRITON_CALL:
                    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                    configs.append(
                        (
                            ir.StringAttr(config["name"]).value,
                            tuple(ir.IntegerAttr(config[f"grid_{a}"]).value for a in "xyz"),
                            ir.IntegerAttr(config["num_warps"]).value,
                            ir.IntegerAttr(config["num_stages"]).value,
                            ir.StringAttr(config["ir"]).value_bytes,
                        )
                    )
            return ir.WalkResult.ADVANCE

        module.operation.walk(visit)

    kernels = []
    with lowering._new_ir_context():
        for name, grid, warps, stages, bytecode in configs:
            text = ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)
            kernels.append(TritonKernel(name, grid, warps, stages, text))
    return kernels


def compile_for_gpu(kernel: TritonKernel, arch: int = 90) -> KernelResources:
    """Compiles one captured kernel with the `triton` package and reads its resources."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise RuntimeError(
            "compile_for_gpu needs the `triton` package (pip install triton; it runs on CPU)."
        ) from e
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(source, "w") as f:
            f.write(kernel.ir)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
        )
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = subprocess.run(
            [tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    ptx = compiled.asm["ptx"]
    return KernelResources(
        name=kernel.name,
        registers=int(usage["REG"]),
        spill_stack_bytes=int(usage["STACK"]) + int(usage["LOCAL"]),
        shared_memory_bytes=int(compiled.metadata.shared),
        num_warps=kernel.num_warps,
        num_stages=kernel.num_stages,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        tcgen05=len(re.findall(r"\btcgen05\.mma\b", ptx)),
    )
