#!/usr/bin/env bash
# GPU check: the GPU tests, then the attention benchmark, on a CUDA machine with
# jax 0.11.2 (cuda13) and pytest already installed; installs nothing.
# Usage: bash experiments/gpu_check.sh [--with-model]   (logs go to $OUT if set, else ./out)
# --with-model adds the CCNet R-101 training-step benchmark (769x769, batch 2), a few more minutes.
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
model_rc=0
if [ "${1:-}" = "--with-model" ]; then
  timeout 300 python3 experiments/bench_model.py --iters 5 2>&1 | tee "$out/bench_model.log"
  model_rc=${PIPESTATUS[0]}
fi
echo "gpu tests exit $tests_rc, attention benchmark exit $bench_rc, model benchmark exit $model_rc"
exit $(( tests_rc || bench_rc || model_rc ))
