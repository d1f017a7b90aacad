"""experiments/bench_model.py's reading of why an attention implementation cannot serve a model, and
the GPU scripts' imports."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from pallas_kernels.criss_cross.implementations import choose
from tests.experiment_scripts import load_experiment


def test_a_map_the_mosaic_kernels_cannot_take_is_reported_not_raised():
    # A whole 1024x2048 Cityscapes image reaches the attention as 129x257 maps.
    with pytest.raises(ValueError) as error:
        choose("mosaic", dtype=jnp.bfloat16, h=129, w=257, cqk=64, on_cuda=True, device_kind="NVIDIA H100 80GB HBM3",
               interpret=False)
    reason = load_experiment("bench_model").unservable(error.value)
    assert reason == "their strips hold at most 256 pixels, and this map is 129x257"


def test_other_errors_are_not_taken_for_it():
    error = ValueError("criss_cross_attention: unknown implementation 'cuda'")
    assert load_experiment("bench_model").unservable(error) is None


@pytest.mark.parametrize("script", ["bench_model", "bench_attention", "bench_convs", "tune_attention",
                                    "compile_model_h100", "nonlocal_vs_rcca"])
def test_gpu_scripts_import_without_the_data_stack(script):
    # The GPU machines have jax, flax and optax but not grain or tensorflow-datasets: on an H100,
    # bench_model once failed to import because the config imported the data transforms.
    blocked = "import sys\nfor name in ('grain', 'tensorflow_datasets', 'tensorflow', 'array_record'):\n" \
              "    sys.modules[name] = None\n"
    code = blocked + f"from tests.experiment_scripts import load_experiment\nload_experiment({script!r})\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
