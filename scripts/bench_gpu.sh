#!/usr/bin/env bash
# One GPU session: the kernel tests compiled, then end-to-end decode and kernel benchmarks.
# Results go to $OUT (default ./bench_out). BENCHMARKS.md records what this printed.
#   bash scripts/bench_gpu.sh
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if [ -d .whl ]; then  # wheels carried to a machine without a package index (gguf for the test fixtures)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
POLICIES=fp16,kivi4,kivi2,mixed@3,int8-sink
python3 -m pytest -q --tb=line -W ignore::DeprecationWarning tests/test_pallas_decode_attention.py \
    tests/test_pallas_quantize_pack.py "tests/test_policies.py::test_pallas_kernels_decode_equals_reference" \
    2>&1 | tail -8 | tee "$OUT/tests.txt"
python3 -m kvjax.bench --preset SmolLM-360M --kv $POLICIES --contexts 1024,8192,32768 \
    --batch 1 --decode-steps 16 --repeats 2 --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/e2e_b1.txt"
python3 -m kvjax.bench --preset SmolLM-360M --kv $POLICIES --contexts 4096 \
    --batch 16 --decode-steps 16 --repeats 2 --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/e2e_b16.txt"
python3 -m kvjax.bench --preset SmolLM-360M --kv $POLICIES --contexts 4096 \
    --kv-budget-gib 8 --decode-steps 16 --repeats 2 --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/e2e_budget.txt"
python3 -m pallas_kernels.bench --models SmolLM-360M,SmolLM-1.7B --contexts 4096,16384,32768 --batches 1,16 \
    --repeats 5 --json "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.txt"
python3 -m eval.report --latency "$OUT/bench.jsonl" --out "$OUT/latency.md"
