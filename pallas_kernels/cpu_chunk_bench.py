"""`python -m pallas_kernels.cpu_chunk_bench`: a prompt's attention, chunk by chunk, against this machine's limits.

Times the attention of a whole prompt of T tokens prefilled in chunks of C (what fp16's cache does
in kvjax.generation.prefill): for each chunk, its C queries per row over the float16 cache
[L, b, k, T, h] with a causal mask [b, C, T] (blocks of slots no query sees yet are skipped), at a
model's shapes (default SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64), through XLA
(`xla_attention.chunk_partials`, what every backend but Native runs) and through the C++ chunk kernel
(`cpu_chunk_attention.chunk_partials`, reading the cache in place at the layer index), one jitted
`lax.scan` over the chunks and `--layers` layers each. Multiply-adds: 2 h per query head and slot
it sees, b n h T (T + 1) per layer (the last chunk's padding sees nothing). The limit is the machine's vector multiply-add rate on
`--threads` threads (pallas_kernels.cpu_limits.cc, the kernel's flags), measured in every round
beside the two paths; "of FMA" and "vs XLA" are medians over the rounds of each round's own ratio.

    python -m pallas_kernels.cpu_chunk_bench --contexts 4096,8000 --batches 1,4 [--chunk 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_attention, cpu_chunk_attention
from pallas_kernels import xla_attention as xla
from pallas_kernels.cpu_bench import Limits, Shapes, cpu_model

PATHS = ("xla", "kernel")


@functools.partial(jax.jit, static_argnames=("path", "chunk", "context"))
def prompt_attention(qs, keys, values, *, path: str, chunk: int, context: int):
    """The attention of every chunk of a prompt of `context` tokens in every layer: qs [steps, L, b, C,
    n, h] over keys, values [L, b, k, steps C, h] -> the sum of the outputs (so that nothing is skipped)."""
    L, b, k, T, h = keys.shape
    slots = jnp.arange(T)

    def one_chunk(total, xs):
        m, q_layers = xs
        position = m * chunk + jnp.arange(chunk)[:, None]  # the last chunk's padding sees nothing
        mask = jnp.broadcast_to((slots[None, :] <= position) & (position < context), (b, chunk, T))

        def one_layer(total, ys):
            layer, q = ys
            if path == "kernel":
                p = cpu_chunk_attention.chunk_partials(q, [(xla.slices(keys, values, layer), mask)])
            else:
                p = xla.chunk_partials(q, xla.slices(keys, values, layer), mask, kv_heads=k)
            return total + jnp.sum(xla.merge_partials([p])), None

        return jax.lax.scan(one_layer, total, (jnp.arange(L), q_layers))[0], None

    return jax.lax.scan(one_chunk, jnp.float32(0), (jnp.arange(qs.shape[0]), qs))[0]


def run_case(s: Shapes, layers: int, b: int, context: int, chunk: int, limits: Limits, rounds: int):
    steps = -(-context // chunk)
    T = steps * chunk
    rng = np.random.default_rng(context + b)
    qs = jnp.asarray(rng.standard_normal((steps, layers, b, chunk, s.heads, s.head_dim), np.float32))
    keys, values = (jnp.asarray(rng.standard_normal((layers, b, s.kv_heads, T, s.head_dim), np.float32), jnp.float16)
                    for _ in range(2))
    macs = layers * b * s.heads * s.head_dim * context * (context + 1)  # 2 h per query head and seen slot
    fns = {path: functools.partial(prompt_attention, qs, keys, values, path=path, chunk=chunk, context=context)
           for path in PATHS}
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile, warm up
    out = []
    for _ in range(rounds):
        r = dict(fma=limits.fma_rate(), s={})
        for path, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            r["s"][path] = time.perf_counter() - t0
        out.append(r)
    median = lambda xs: float(np.median(list(xs)))
    rows = []
    for path in PATHS:
        t = median(r["s"][path] for r in out)
        rows.append(dict(path=path, context=context, batch=b, layers=layers, chunk=chunk, s=t, macs=macs,
                         GMACs=macs / t / 1e9, fma_GMACs=median(r["fma"] for r in out) / 1e9,
                         of_fma=median(macs / r["s"][path] / r["fma"] for r in out),
                         vs_xla=median(r["s"]["xla"] / r["s"][path] for r in out),
                         rounds=[r["s"][path] for r in out]))
    return rows


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pallas_kernels.cpu_chunk_bench", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=_ints, default=[4096, 8000], help="prompt tokens, comma-separated")
    p.add_argument("--batches", type=_ints, default=[1, 4], help="comma-separated")
    p.add_argument("--chunk", type=int, default=256, help="prompt tokens per chunk (kvjax.generation.chunk_size)")
    p.add_argument("--layers", type=int, default=1, help="layers timed (each the same work; the model has 30)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the FMA loop")
    p.add_argument("--json", default=None, help="write all rows here")
    args = p.parse_args(argv)
    if jax.default_backend() != "cpu" or not cpu_attention.available():
        print(f"error: no CPU kernel here ({cpu_attention.unavailable_reason() or jax.default_backend()})",
              file=sys.stderr)
        return 2
    s, limits = Shapes(), Limits(args.threads)
    print(f"{cpu_model()} | {os.cpu_count()} CPUs | jax {jax.__version__} | FMA limit on {args.threads} threads | "
          f"{s.heads} query heads, {s.kv_heads} kv heads, head dim {s.head_dim}, chunks of {args.chunk}", flush=True)
    print(f"{'path':<7} {'tokens':>6} {'b':>2} {'s/layer':>8} {'GMAC':>7} {'GMAC/s':>7} {'FMA GMAC/s':>10} "
          f"{'of FMA':>7} {'vs XLA':>7} {'30 layers s':>11}", flush=True)
    rows = []
    for b in args.batches:
        for context in args.contexts:
            for r in run_case(s, args.layers, b, context, args.chunk, limits, args.rounds):
                rows.append(r)
                per_layer = r["s"] / r["layers"]
                print(f"{r['path']:<7} {r['context']:>6} {b:>2} {per_layer:>8.3f} {r['macs'] / r['layers'] / 1e9:>7.2f} "
                      f"{r['GMACs']:>7.1f} {r['fma_GMACs']:>10.1f} {r['of_fma']:>7.0%} {r['vs_xla']:>6.2f}x "
                      f"{30 * per_layer:>11.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
