#!/usr/bin/env bash
# GPU check: the GPU tests, then the attention benchmark, on a CUDA machine with
# jax 0.11.2 (cuda13) and pytest + pytest-xdist already installed; installs nothing.
# Usage: bash experiments/gpu_check.sh [--with-model]   (logs go to $OUT if set, else ./out)
# --with-model adds the CCNet-101 training step (769x769, batch 2) in JAX, per attention
# implementation, and the same step in PyTorch (experiments/torch_ccnet.py) on the same card.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/devices.log"
# Four test processes share the card (each may take a fifth of its memory): compiling the
# kernels, which is host work, then runs in parallel (one process took 206 s for the 20 Triton
# cases on an H100).
XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout 300 python3 -m pytest -q -p no:cacheprovider -n 4 \
  tests/test_attention_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -5
tests_rc=${PIPESTATUS[0]}
timeout 240 python3 experiments/bench_attention.py 2>&1 | tee "$out/bench_attention.log"
bench_rc=${PIPESTATUS[0]}
model_rc=0
if [ "${1:-}" = "--with-model" ]; then
  timeout 240 python3 experiments/bench_model.py 2>&1 | grep -v "^W[0-9]" | tee "$out/bench_model.log"
  model_rc=${PIPESTATUS[0]}
  timeout 90 python3 experiments/torch_ccnet.py 2>&1 | tee "$out/torch_ccnet.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
fi
echo "gpu tests exit $tests_rc, attention benchmark exit $bench_rc, model benchmarks exit $model_rc"
exit $(( tests_rc || bench_rc || model_rc ))
