#!/usr/bin/env bash
# The CPU benchmark of BENCHMARKS.md, on a quiet machine: decode at SmolLM2-135M's shapes (random
# weights, cache filled directly) at batch 1 and 8 and at a fixed KV budget, with fp16 stored both
# in float16 (the default) and float32; then prefill and decode of the real default model at 4k.
# Results go to $OUT (default ./bench_out). Takes about 30 minutes on 2 cores.
#   bash scripts/bench_cpu.sh
set -euo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
POLICIES=${POLICIES:-fp16,kivi4,kivi2,int8-sink,band@3}
grep -m1 'model name' /proc/cpuinfo | tee "$OUT/cpu.txt"
bench() { python -m kvjax.bench --decode-steps 16 --repeats 3 --json "$OUT/bench.jsonl" "$@"; }
bench --preset SmolLM2-135M --kv $POLICIES --contexts 1024,8192 --batch 1 | tee "$OUT/b1.txt"
bench --preset SmolLM2-135M --kv fp16 --kv-dtype float32 --contexts 1024,8192 --batch 1 | tee -a "$OUT/b1.txt"
bench --preset SmolLM2-135M --kv $POLICIES --contexts 4096 --batch 8 | tee "$OUT/b8.txt"
bench --preset SmolLM2-135M --kv fp16 --kv-dtype float32 --contexts 4096 --batch 8 | tee -a "$OUT/b8.txt"
bench --preset SmolLM2-135M --kv $POLICIES --contexts 4096 --kv-budget-gib 0.5 | tee "$OUT/budget.txt"
bench --preset SmolLM2-135M --kv fp16 --kv-dtype float32 --contexts 4096 --kv-budget-gib 0.5 | tee -a "$OUT/budget.txt"
bench --kv $POLICIES --contexts 4096 --batch 1 | tee "$OUT/model.txt"
bench --kv fp16,kivi2 --contexts 1024 --batch 1 --dtype bfloat16 | tee "$OUT/model-bf16.txt"
