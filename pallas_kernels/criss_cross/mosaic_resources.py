"""Registers and spills of the Mosaic GPU kernels, and their PTX, compiled for an H100 without a GPU.

On the compile-only H100 of h100_target.py, XLA runs Mosaic GPU's whole
pipeline down to ptxas for sm_90a, and with MOSAIC_GPU_DUMP_PTXAS=1 ptxas
reports each kernel's registers and spills. ptxas writes to the process's
own stdout, and the plugin needs JAX_PLATFORMS=cpu before jax starts, so
each compilation runs in a child process
(`python -m pallas_kernels.criss_cross.mosaic_resources`).

The registers ptxas reports are the launch bound shared by every warpgroup
(65536 / threads: 168 with three warpgroups); the compute warpgroups raise
theirs to 232 with setmaxnreg. Spills are what to watch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from pallas_kernels.criss_cross.h100_target import INSTALL_HINT, compile_only_h100_mesh, cuda_plugin_installed


@dataclasses.dataclass(frozen=True)
class MosaicKernelResources:
    """What ptxas reported for one kernel (sm_90a)."""

    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int


_ENTRY = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_PTX_ENTRY = re.compile(r"\.entry (\w+)")


def parse_ptxas(log: str) -> list[MosaicKernelResources]:
    """Each Mosaic kernel's registers and spills, in order, from ptxas's `-v` report."""
    kernels, name, spills = [], None, None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            name, spills = match.group(1), None
        elif name and (match := _SPILLS.search(line)):
            spills = int(match.group(1)), int(match.group(2))
        elif name and spills and (match := _REGISTERS.search(line)):
            if name.startswith("criss_cross_mosaic"):
                kernels.append(MosaicKernelResources(name.removesuffix("_mosaic_gpu_kernel"), int(match.group(1)),
                                                     *spills))
            name = None
    return kernels


def mosaic_kernel_resources(
    shape: tuple[int, int, int, int, int],
    dtype: str = "bfloat16",
    config: dict | None = None,
    backward: bool = True,
    timeout_s: float = 600,
) -> list[MosaicKernelResources]:
    """Compile the Mosaic op (forward, and with `backward` its VJP) at (B, H, W, Cqk, Cv) for an
    H100 in a child process and return each Mosaic kernel's resources. `config` holds
    MosaicConfig fields. RuntimeError (with the child's output) if the compilation fails."""
    return parse_ptxas(_compile_in_child(shape, dtype, config, backward, {"MOSAIC_GPU_DUMP_PTXAS": "1"}, timeout_s))


def mosaic_kernel_ptx(
    shape: tuple[int, int, int, int, int],
    dtype: str = "bfloat16",
    config: dict | None = None,
    backward: bool = True,
    timeout_s: float = 600,
) -> dict[str, str]:
    """The PTX of each Mosaic kernel of the op at (B, H, W, Cqk, Cv), by kernel name (as in
    `mosaic_kernel_resources`), compiled for an H100 as there: what to count instructions in."""
    with tempfile.TemporaryDirectory() as folder:
        _compile_in_child(shape, dtype, config, backward, {"MOSAIC_GPU_DUMP_PTX": "1", "MOSAIC_GPU_DUMP_TO": folder},
                          timeout_s)
        texts = [path.read_text() for path in sorted(Path(folder).glob("criss_cross_mosaic*.ptx"))]
    return {_PTX_ENTRY.search(text).group(1).removesuffix("_mosaic_gpu_kernel"): text for text in texts}


def _compile_in_child(shape: tuple[int, int, int, int, int], dtype: str, config: dict | None, backward: bool,
                      dump: dict[str, str], timeout_s: float) -> str:
    """Compile the op (as `mosaic_kernel_resources` says) in a child process with Mosaic GPU's `dump`
    variables set; its output. RuntimeError (with that output) if the compilation fails."""
    if not cuda_plugin_installed():
        raise RuntimeError(INSTALL_HINT)
    request = json.dumps({"shape": list(shape), "dtype": dtype, "config": config or {}, "backward": backward})
    env = dict(os.environ, JAX_PLATFORMS="cpu", **dump)
    done = subprocess.run([sys.executable, "-m", __name__, request], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"compiling the Mosaic kernels at {shape} failed:\n{log[-4000:]}")
    return log


def _compile(request: dict) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import MosaicConfig, criss_cross_attention

    mesh = compile_only_h100_mesh(("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    b, h, w, cqk, cv = request["shape"]
    config = MosaicConfig(**request["config"])

    def op(q, k, v):
        return criss_cross_attention(q, k, v, implementation="mosaic", config=config)

    def forward_backward(q, k, v, g):
        out, vjp = jax.vjp(op, q, k, v)
        return out, *vjp(g)

    dtype = jnp.dtype(request["dtype"])
    args = [jax.ShapeDtypeStruct((b, h, w, c), dtype, sharding=replicated) for c in (cqk, cqk, cv, cv)]
    fn, args = (forward_backward, args) if request["backward"] else (op, args[:3])
    with jax.set_mesh(mesh):
        jax.jit(fn).lower(*args).compile()


if __name__ == "__main__":
    _compile(json.loads(sys.argv[1]))
