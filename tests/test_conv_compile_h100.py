"""The backbone's dilated convs compiled for an H100 without a GPU: which cuDNN convolutions XLA
asks for.

On an H100, cuDNN ran bfloat16 dilated 3x3 convs 8x slower than undilated ones
(experiments/RESULTS.md). Compiled, XLA turns a dilated conv's input gradient into a forward conv
with a dilated kernel, and its kernel gradient into a forward conv with a 97x97 window at stride 2:
convolutions cuDNN has no fast kernels for. The space-to-batch form must reach cuDNN as its three
plain convolutions. Needs jax's CUDA plugin in .sm90 (as tests/test_mosaic_compile.py; .ci/run
installs it); skips without it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels.criss_cross.h100_target import compile_only_h100_mesh, cuda_plugin_installed
from tests.experiment_scripts import load_experiment

pytestmark = pytest.mark.skipif(
    not cuda_plugin_installed(),
    reason="compiling for an H100 needs jax's CUDA plugin (pip install --target .sm90 jax-cuda13-plugin==0.11.2, "
    "then PYTHONPATH=.sm90); no GPU is needed",
)


def _cudnn_convs(dilated_convs: str, dilation: int, channels: int) -> list[str]:
    """'target window' of each cuDNN convolution in the compiled forward+backward of one 3x3 conv
    at CCNet's (2, 97, 97) maps, bfloat16. In a fresh interpreter: the plugin registers its
    compile-only H100 only when jax starts with JAX_PLATFORMS=cpu."""
    code = ("import json\nfrom tests.test_conv_compile_h100 import compiled_cudnn_convs\n"
            f"print(json.dumps(compiled_cudnn_convs({dilated_convs!r}, {dilation}, {channels})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compiled_cudnn_convs(dilated_convs: str, dilation: int, channels: int) -> list[str]:
    """`_cudnn_convs` in this process (jax started with JAX_PLATFORMS=cpu), of the program that
    experiments/bench_convs.py times."""
    step = load_experiment("bench_convs").conv_step(dilation, dilated_convs)
    mesh = compile_only_h100_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((2, 97, 97, channels), jnp.bfloat16, sharding=replicated)
    w = jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.bfloat16, sharding=replicated)
    with jax.set_mesh(mesh):  # as compile_model_h100.py traces: "auto" sees the H100 it lowers for
        text = step.lower(x, w).compile().as_text()
    found = []
    for line in text.splitlines():
        target = re.search(r'custom_call_target="(__cudnn\$conv\w*)"', line)
        if target:
            found.append(f"{target.group(1)} {re.search(r'window=\{([^}]*)\}', line).group(1)}")
    return sorted(found)


@pytest.mark.parametrize("dilated_convs,dilation,channels", [("space_to_batch", 2, 256), ("space_to_batch", 4, 512),
                                                             ("auto", 2, 256)])
def test_space_to_batch_reaches_cudnn_as_plain_convolutions(dilated_convs, dilation, channels):
    # "auto", the model's default, rewrites when lowering for a CUDA GPU.
    assert _cudnn_convs(dilated_convs, dilation, channels) == [
        "__cudnn$convBackwardFilter size=3x3",
        "__cudnn$convBackwardInput size=3x3",
        "__cudnn$convForward size=3x3",
    ]


def test_native_dilated_conv_reaches_cudnn_dilated():
    # What the rewrite avoids: the dilation, and a 97x97-window kernel gradient.
    convs = _cudnn_convs("native", 2, 256)
    assert len(convs) == 3 and sum("rhs_dilate=2x2" in c for c in convs) == 2
    assert any("size=97x97 stride=2x2" in c for c in convs)
