#!/usr/bin/env bash
# GPU check: the GPU tests, then the attention benchmark, on a CUDA machine with
# jax 0.11.2 (cuda13) and pytest already installed; installs nothing.
# Usage: bash experiments/gpu_check.sh   (logs go to $OUT if set, else ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/devices.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
timeout 240 python3 experiments/bench_attention.py --iters 30 2>&1 | tee "$out/bench_attention.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, benchmark exit $bench_rc"
exit $(( tests_rc || bench_rc ))
