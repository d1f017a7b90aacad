"""experiments/bench_model.py's reading of why an attention implementation cannot serve a model, and
the GPU scripts' imports."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from pallas_kernels.criss_cross.implementations import LoweringTarget, choose
from tests.experiment_scripts import load_experiment


def test_a_map_the_mosaic_kernels_cannot_take_is_reported_not_raised():
    # A whole 1024x2048 Cityscapes image reaches the attention as 129x257 maps.
    with pytest.raises(ValueError) as error:
        choose("mosaic", dtype=jnp.bfloat16, h=129, w=257, cqk=64,
               target=LoweringTarget(True, "NVIDIA H100 80GB HBM3", 90), interpret=False)
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


@pytest.mark.slow
def test_training_rows_for_each_remat_level_and_recomputing_needs_no_more_memory():
    # Run as the GPU check runs it (a subprocess on the CPU, the quick narrow network): one row per
    # level asked for, each with its step time and XLA's memory for the compiled step.
    done = subprocess.run(
        [sys.executable, "experiments/bench_model.py", "--quick", "--tables", "train", "--dtypes", "float32",
         "--remat-attention", "none", "all"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        # One CPU device, as a user's machine has: the suite's several would split the batch of 2.
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[3]: line.split() for line in done.stdout.splitlines() if line.startswith("float32 ")}
    assert set(rows) == {"none", "all"}, done.stdout
    for cells in rows.values():
        step_ms, images_per_s, mib = map(float, cells[4:7])
        assert step_ms > 0 and images_per_s > 0 and mib > 0
    assert float(rows["all"][6]) <= float(rows["none"][6])
