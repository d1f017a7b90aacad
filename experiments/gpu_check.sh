#!/usr/bin/env bash
# GPU check on a CUDA machine with jax 0.11.2 (cuda13), pytest and pytest-xdist already
# installed; installs nothing. Logs go to $OUT if set, else ./out.
#
#   bash experiments/gpu_check.sh [MODE ...]     (default: kernels)
#
# The modes given run in this order, whatever the order given: tests, bench, mosaic, train,
# model, tune, demo. An unknown mode stops the script before anything runs.
#
# tests: the GPU tests of every implementation (Triton everywhere, Mosaic on Hopper), at most
#   5 minutes; cut off, pytest is interrupted and still prints what passed, what failed and the
#   slowest cases. XLA autotuning is off (it only chooses among programs equal up to rounding):
#   on 2026-11-27 an H100 ran all 40 cases in 60 s (with it on, 16 of 40 in 5 minutes).
# bench: the attention benchmark, bfloat16 at the four CCNet shapes, then float32. At most
#   4 minutes (about 80 s per shape and dtype on an H100).
# kernels: tests, then bench.
# mosaic (Hopper only): experiments/mosaic_diagnose.py, each Mosaic pass alone against a float64
#   reference, saying which strips, positions and channel tiles are wrong: the row and column
#   forward, each direction's backward alone, the whole op, in bfloat16 and in float32 (float16
#   pairs; per direction dq comes from the query-side kernel, dk and dv from the key side). About
#   3 minutes in bfloat16 alone (2026-11-27); float32 (two shapes, both layouts) is new: at most 7.
# train: the CCNet-101 bfloat16 training step (769x769, batch 2) with the default kernel (Mosaic on
#   Hopper, else Triton) and xla, each with the backbone's dilated convs as space-to-batch (the
#   default) and native; then the same step in PyTorch with bf16 autocast
#   (experiments/torch_ccnet.py) on the same card; then the dilated 3x3 convs alone, both ways
#   (experiments/bench_convs.py, keeping one call's trace as conv_trace.json.gz, to check
#   ccnet_jax/trace_times.py against). Each step's row follows its 8 busiest kernels. About 5 minutes
#   (each R-101 program compiles for about a minute). On 2026-11-27 an H100 ran `tests train`
#   in 362 s.
# model: what train does not time: the float32 training step per implementation (default convs;
#   on Hopper Mosaic's float32 kernels first, never timed in a step yet) beside PyTorch's (TF32), and whole-image inference (1024x2048, batch 1) per dtype and
#   implementation (seven R-101 programs: 171 s on an H100 on 2026-11-27); then the bfloat16 step
#   with the attention layers recomputing nothing, their projections, or everything in the
#   backward (CCNetConfig.remat_attention: what the memory saved costs in time; never run on a
#   card yet), and experiments/nonlocal_vs_rcca.py (the RCCA head against a non-local block:
#   XLA's and the card's peak memory per program; never run on a card yet). About 6-8 minutes,
#   a call of its own; its steps' limits add up past a call's 10 minutes, so a slow card loses
#   the last ones, the new. `train` and `model`, one call each, time every table.
# tune: the bfloat16 launch options that decide the defaults, at (2, 97, 97, 64, 512): the
#   Triton default, and on Hopper the Mosaic default (three value tiles in flight in the forward
#   at this shape: ahead of two in four runs on H100s, by 2-6% forward+backward in the three
#   steady ones), the same with every kernel taking the images first to last (the default has each
#   second kernel start from the last image, where L2 may still hold the first kernel's maps; never
#   timed yet), two CTAs per strip, and the persistent forward (one CTA per SM looping over the
#   strips; never timed yet) alone and with two CTAs per strip, then the Triton kernels with their
#   second kernels taking the Cv tiles first to last too (the default turns them back from the
#   last tile, which L2 may still hold; never timed yet; last, so that a slow card cuts it before
#   a Mosaic option); then float32 at the same shape: the Triton
#   default (products as six bfloat16 ones, bf16x6; one backward stage at 97x97), the same
#   kernels with scaled float16 pairs (f16x3: three products; alone, with 128-pixel blocks, and
#   with 64-key dK/dQ blocks at 8 warps), bf16x6 with 128-pixel blocks, and on Hopper the Mosaic
#   kernels on float16 pairs (forward and backward), each against exact xla. Each variant's busiest kernels follow its row (--profile): which kernel
#   holds the float32 backward's 1.1-1.3 ms is the next thing to learn. About 3 minutes; each
#   dtype is cut at 3 and 4 minutes, so `tests tune` (tests cut at 5) may run 12 minutes at
#   worst, past a call's 10: the float32 tuning, last, is then what the call's limit cuts.
# demo: the README's main command as a user runs it, on the card: `ccnet demo` (prepares the
#   embedded long_range dataset, trains 800 steps, evaluates, draws pictures) in bfloat16 with
#   implementation=None, so Mosaic on Hopper. The image lacks the data stack (tensorflow-datasets,
#   grain, array-record) and a few small packages: `python experiments/gpu_wheels.py` saves their
#   wheels in .whl here (10.5 MiB), the device call names .whl in carry, and this mode installs them
#   into /tmp/ccnet_site. The log and the first four pictures by file name (two images' prediction
#   and attention) come back in $OUT/demo (a call returns at most 8 files). On 2026-11-27 an H100
#   ran it in about 2.5 minutes.
# In a 15-minute lease, by priority: `tests tune` in one call (3 minutes on 2026-11-27: the GPU
# tests after a kernel change, the launch options, and the float32 kernels' profiles); `mosaic`
# next if a Mosaic test failed; then what has not run on a card since the last kernel or model
# change. On 2026-11-27 every mode ran on an H100 (`model` in about 3 minutes before its remat
# and memory steps were added, now 6-8 estimated; `bench` 4, `train` 5, `demo` 2.5). A call may
# run 10 minutes; a machine goes back after 30 s idle, so have the next call ready.
set -uo pipefail
cd "$(dirname "$0")/.."
modes=" ${*:-kernels} "
[[ $modes == *" kernels "* ]] && modes+="tests bench "
for mode in $modes; do
  case "$mode" in
    tests|bench|kernels|mosaic|train|model|tune|demo) ;;
    *) echo "gpu_check.sh: unknown mode '$mode'; use tests, bench, kernels, mosaic, train, model, tune or demo" >&2
       exit 2 ;;
  esac
done
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/devices.log"
is_hopper() {
  python3 -c "import jax, sys; from pallas_kernels.criss_cross.implementations import is_hopper; \
sys.exit(not is_hopper(jax.devices()[0].device_kind))"
}
tests_rc=0 bench_rc=0 diagnose_rc=0 model_rc=0 tune_rc=0 demo_rc=0
if [[ $modes == *" tests "* ]]; then
  # Eight test processes share the card (each may take a tenth of its memory): compiling the
  # kernels, which is host work, then runs in parallel. -v names each case as it ends. At the
  # limit, SIGINT (to the whole process group) lets pytest report before it exits.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 XLA_FLAGS="--xla_gpu_autotune_level=0 ${XLA_FLAGS:-}" \
    timeout -s INT -k 30 300 python3 -m pytest -p no:cacheprovider -n 8 -v --durations=40 \
    tests/test_attention_gpu.py 2>&1 | tee "$out/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -20
  tests_rc=${PIPESTATUS[0]}
fi
if [[ $modes == *" bench "* ]]; then
  timeout 240 python3 experiments/bench_attention.py 2>&1 | tee "$out/bench_attention.log"
  bench_rc=${PIPESTATUS[0]}
fi
if [[ $modes == *" mosaic "* ]]; then
  # The shapes where the card and the interpreter have parted: strips of 97 pixels (also at the
  # CCNet size), and past 128 pixels (one query warpgroup past the keys, the long backward), which
  # the float32 kernels (float16 pairs, never yet run on a card) skip.
  timeout 420 python3 experiments/mosaic_diagnose.py --dtypes bfloat16 float32 --shapes 1,8,97,64,64 \
    2,97,97,64,512 1,8,150,64,64 1,8,200,64,64 2>&1 | grep -v "^W[0-9]" | tee "$out/mosaic_diagnose.log"
  diagnose_rc=${PIPESTATUS[0]}
fi
if [[ $modes == *" train "* ]]; then
  implementations=(triton xla)
  is_hopper && implementations=(mosaic xla)
  timeout 300 python3 experiments/bench_model.py --dtypes bfloat16 --tables train --implementations \
    "${implementations[@]}" --dilated-convs space_to_batch native --profile 2>&1 | grep -v "^W[0-9]" \
    | tee "$out/bench_model.log"
  model_rc=${PIPESTATUS[0]}
  timeout 60 python3 experiments/torch_ccnet.py --dtypes bfloat16 2>&1 | tee "$out/torch_ccnet.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
  timeout 60 python3 experiments/bench_convs.py --save-trace "$out/conv_trace.json.gz" 2>&1 | grep -v "^W[0-9]" \
    | tee "$out/bench_convs.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
fi
if [[ $modes == *" model "* ]]; then
  timeout 240 python3 experiments/bench_model.py --dtypes float32 --tables train 2>&1 | grep -v "^W[0-9]" \
    | tee "$out/bench_model_float32.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
  timeout 60 python3 experiments/torch_ccnet.py --dtypes float32 2>&1 | tee "$out/torch_ccnet_float32.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
  timeout 330 python3 experiments/bench_model.py --tables inference 2>&1 | grep -v "^W[0-9]" \
    | tee "$out/bench_inference.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
  remat_implementation=triton
  is_hopper && remat_implementation=mosaic
  timeout 150 python3 experiments/bench_model.py --dtypes bfloat16 --tables train --implementations \
    "$remat_implementation" --remat-attention none projections all 2>&1 | grep -v "^W[0-9]" \
    | tee "$out/bench_model_remat.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
  timeout 240 python3 experiments/nonlocal_vs_rcca.py --markdown 2>&1 | grep -v "^W[0-9]" \
    | tee "$out/nonlocal_vs_rcca.log"
  model_rc=$(( model_rc || PIPESTATUS[0] ))
fi
if [[ $modes == *" tune "* ]]; then
  variants=(default)
  if is_hopper; then
    variants+=(mosaic "mosaic, images in one order" "mosaic, 2 value splits")
    variants+=("mosaic, persistent" "mosaic, persistent, 2 value splits")
  fi
  variants+=("Cv tiles in one order")
  timeout 180 python3 experiments/tune_attention.py --dtypes bfloat16 --iters 5 --profile --variants "${variants[@]}" 2>&1 \
    | grep -v "^W[0-9]" | tee "$out/tune_attention.log"
  tune_rc=${PIPESTATUS[0]}
  float32_variants=(default f16x3 "f16x3, blocks 128, 8 warps" "blocks 128, 8 warps")
  float32_variants+=("f16x3, dK/dQ key block 64, 8 bwd warps")
  if is_hopper; then
    float32_variants+=(mosaic)
  fi
  timeout 240 python3 experiments/tune_attention.py --dtypes float32 --iters 5 --profile --variants "${float32_variants[@]}" \
    2>&1 | grep -v "^W[0-9]" | tee "$out/tune_attention_float32.log"
  tune_rc=$(( tune_rc || PIPESTATUS[0] ))
fi
if [[ $modes == *" demo "* ]]; then
  if ! python3 -c "import grain, tensorflow_datasets" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ccnet_site \
        .whl/*.whl || demo_rc=1
      export PYTHONPATH="$PYTHONPATH:/tmp/ccnet_site"
    else
      echo "gpu_check.sh demo: grain and tensorflow-datasets are missing here and .whl has no wheels; run" \
        "'python experiments/gpu_wheels.py' where pip works and carry .whl" >&2
      demo_rc=1
    fi
  fi
  if (( demo_rc == 0 )); then
    mkdir -p "$out/demo"
    timeout 300 python3 -m ccnet_jax.cli demo --workdir /tmp/ccnet_demo --data-dir /tmp/ccnet_demo_data \
      --set train.compute_dtype=bfloat16 --set model.implementation=null 2>&1 | grep --line-buffered -v "^W[0-9]" \
      | tee "$out/demo/demo.log"
    demo_rc=${PIPESTATUS[0]}
    ls /tmp/ccnet_demo/pictures/*.png 2>/dev/null | head -4 | xargs -r cp -t "$out/demo/"
  fi
fi
echo "gpu tests exit $tests_rc, attention benchmark exit $bench_rc, Mosaic diagnosis exit $diagnose_rc," \
  "model benchmarks exit $model_rc, tuning exit $tune_rc, demo exit $demo_rc"
exit $(( tests_rc || bench_rc || diagnose_rc || model_rc || tune_rc || demo_rc ))
