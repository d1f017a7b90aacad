"""A compile-only H100: compile for CUDA on a machine without a GPU.

jax's CUDA plugin (`jax-cuda13-plugin==0.11.2`; it needs no CUDA libraries
to compile) makes a compile-only topology from a description of the card,
and a jit lowered with shardings on a mesh of its devices compiles with
XLA's GPU compiler all the way to machine code: Mosaic GPU and Triton
kernels included (ptxas must be on the PATH). The plugin registers only
when JAX_PLATFORMS leaves CUDA out (JAX_PLATFORMS=cpu) on a machine without
a GPU, and then reports an error at every jax start-up unless it does, so
keep it out of the project's environment (`pip install --target .sm90`,
then PYTHONPATH=.sm90).
"""

from __future__ import annotations

import importlib.util

from jax.experimental import topologies

# An H100 SXM as XLA's GPU compiler describes it (GpuTargetConfigProto text): compute
# capability 9.0, 132 SMs, 227 KiB of shared memory a block when opted in, 64 Ki registers.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


INSTALL_HINT = ("compiling for CUDA without a GPU needs jax's CUDA plugin: pip install --target .sm90 "
                "'jax-cuda13-plugin==0.11.2', then run with PYTHONPATH=.sm90 (no CUDA libraries, no GPU needed)")


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA plugin is installed (it compiles for CUDA with or without a GPU)."""
    return importlib.util.find_spec("jax_plugins") is not None and (
        importlib.util.find_spec("jax_plugins.xla_cuda13") is not None)


def compile_only_h100_mesh(axis_names: tuple[str, ...] = ("data",)):
    """A one-device Mesh of a compile-only H100 (for `jax.set_mesh` and shardings); RuntimeError
    saying what to install or set if the CUDA plugin cannot provide it."""
    if not cuda_plugin_installed():
        raise RuntimeError(INSTALL_HINT)
    try:
        topology = topologies.get_topology_desc(topology_name="h100", platform="cuda",
                                                target_config=H100_TARGET_CONFIG, topology="1x1x1")
    except NotImplementedError as e:
        raise RuntimeError(f"jax's CUDA plugin did not register ({e}); on a machine without a GPU run with "
                           "JAX_PLATFORMS=cpu") from e
    return topologies.make_mesh(topology, (1,) * len(axis_names), axis_names)
