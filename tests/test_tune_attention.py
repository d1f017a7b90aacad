"""experiments/tune_attention.py's choice of variants and experiments/gpu_check.sh's modes
(the timing itself needs a CUDA GPU)."""

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import default_config
from tests.experiment_scripts import load_experiment


def test_variants_can_be_picked_by_name_beside_the_xla_baseline():
    tune = load_experiment("tune_attention")
    configs = {"xla": None, **tune.variants(default_config(97, 97, 64, 512, 2), jnp.bfloat16)}
    picked = tune.select_variants(configs, ["blocks 64, 4 warps", "default"], "bfloat16")
    assert list(picked) == ["xla", "default", "blocks 64, 4 warps"]
    assert picked["blocks 64, 4 warps"].block_q == 64 and picked["blocks 64, 4 warps"].bwd_num_warps == 4


def test_variants_that_are_the_default_at_the_shape_are_left_out():
    tune = load_experiment("tune_attention")
    at_ccnet = tune.variants(default_config(97, 97, 64, 512, 2), jnp.bfloat16)
    assert "blocks 128, 8 warps" not in at_ccnet and "fwd 8 warps" not in at_ccnet
    at_eval = tune.variants(default_config(128, 256, 64, 512, 2), jnp.bfloat16)
    assert "blocks 128, 8 warps" in at_eval and "blocks 64, 4 warps" not in at_eval


def test_an_unknown_variant_is_refused_with_the_names_there_are():
    tune = load_experiment("tune_attention")
    configs = {"xla": None, **tune.variants(default_config(97, 97, 64, 512, 4), jnp.float32)}
    with pytest.raises(SystemExit, match=r"unknown variants for float32: \['mosaic'\]; .*'tf32'"):
        tune.select_variants(configs, ["mosaic"], "float32")


def _gpu_check_variants(array: str) -> list[str]:
    script = (Path(__file__).parents[1] / "experiments" / "gpu_check.sh").read_text()
    words = [word for line in re.findall(rf"(?<!\w){array}\+?=\((.*)\)", script)
             for word in re.findall(r'"([^"]+)"|(\w+)', line)]
    return [quoted or bare for quoted, bare in words]


def test_the_gpu_check_tunes_variants_that_exist():
    # A misspelt name would only show on the GPU, as a refusal that costs device time.
    tune = load_experiment("tune_attention")
    names = _gpu_check_variants("variants")
    known = {**tune.variants(default_config(97, 97, 64, 512, 2), jnp.bfloat16), **tune.mosaic_variants()}
    assert {"default", "mosaic, images in one order", "mosaic, persistent"} <= set(names)
    assert set(names) <= set(known), set(names) - set(known)
    float32_names = _gpu_check_variants("float32_variants")
    known = {**tune.variants(default_config(97, 97, 64, 512, 4), jnp.float32), "mosaic": None}  # mosaic: on Hopper
    assert "f16x3" in float32_names and "default" in float32_names and "mosaic" in float32_names
    assert set(float32_names) <= set(known), set(float32_names) - set(known)


def test_the_float32_variants_multiply_as_named():
    tune = load_experiment("tune_attention")
    found = tune.variants(default_config(97, 97, 64, 512, 4), jnp.float32)
    assert (found["default"].float32_dot, found["default"].bwd_num_stages) == ("bf16x6", 1)
    # The default before bf16x6, as the H100 timed it (1.718 ms): TF32x3 with two backward stages.
    assert (found["tf32x3"].float32_dot, found["tf32x3"].bwd_num_stages) == ("tf32x3", 2)
    two_stages = found["bwd 2 stages"]
    assert (two_stages.float32_dot, two_stages.bwd_num_stages) == ("bf16x6", 2)
    assert "bwd 1 stage" not in found  # the default at 97x97
    assert tune.variants(default_config(128, 256, 64, 512, 4), jnp.float32)["bwd 1 stage"].bwd_num_stages == 1
    blocks = found["blocks 128, 8 warps"]
    assert (blocks.float32_dot, blocks.block_q, blocks.block_k, blocks.fwd_num_warps, blocks.bwd_num_warps,
            blocks.bwd_num_stages) == ("bf16x6", 128, 128, 8, 8, 2)
    assert found["xla, bf16x6 dots"].precision(jnp.float32) == jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    assert found["xla, bf16x6 dots"].float32_products == "bf16x6"
    assert found["f16x3"] == dataclasses.replace(found["default"], float32_dot="f16x3")
    wide = found["f16x3, dK/dQ key block 64, 8 bwd warps"]
    assert (wide.float32_dot, wide.dkq_key_block, wide.bwd_num_warps, wide.fwd_num_warps) == ("f16x3", 64, 8, 4)


def test_the_gpu_check_profiles_every_tuning_run():
    # A profile costs one traced call; its absence would cost the next lease the per-kernel split.
    script = (Path(__file__).parents[1] / "experiments" / "gpu_check.sh").read_text()
    runs = re.findall(r"python3 experiments/tune_attention\.py[^\n]*", script)
    assert len(runs) == 2 and all("--profile" in run for run in runs), runs


def test_the_gpu_check_refuses_an_unknown_mode_before_running_anything(tmp_path):
    # A misspelt mode would otherwise run nothing and still spend a device start.
    script = Path(__file__).parents[1] / "experiments" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script), "tune", "kernals"], capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=60)
    assert result.returncode == 2
    assert "unknown mode 'kernals'" in result.stderr
    assert not (tmp_path / "out").exists()
