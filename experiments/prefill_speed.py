"""Prefill tokens/s on the real model: a prompt chunk's attention through XLA against the C++ chunk
kernel (`--compare kernels`), or the weights dequantized to float32 against the GGUF's blocks
multiplied in place (`--compare weights`).

For each (policy, prompt length, batch): random token ids prefilled by `kvjax.generation.prefill`
into a cache made with `--kernels reference` (every chunk attended by XLA's blocked matmuls) and
`native` (the C++ chunk kernel, and the decode kernel, which prefill does not use), or, with
`--compare weights`, by the model loaded with `weights="float32"` and `"native"` (native kernels
for both); each is compiled first (not timed), then timed in interleaved rounds, so that a shared
machine's drift hits both. Prints the median tokens/s of each and the ratio, per round too.

    python experiments/prefill_speed.py --kv fp16,kivi2 --cases 4096x1,8000x1,4096x4 [--rounds 2]
    python experiments/prefill_speed.py --compare weights --kv fp16,kivi2 --cases 1024x1,4096x1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from pallas_kernels.cpu_bench import cpu_model

COMPARED = {"kernels": ("reference", "native"), "weights": ("float32", "native")}  # (baseline, new)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", default="fp16,kivi2")
    p.add_argument("--cases", default="4096x1,8000x1,4096x4", help="tokens x batch, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compare", default="kernels", choices=sorted(COMPARED))
    args = p.parse_args()
    variants = COMPARED[args.compare]
    if args.compare == "weights":
        models = {w: kvjax.load_model(weights=w) for w in variants}
        setups = {w: (models[w], "native") for w in variants}
    else:
        model = kvjax.load_model()
        setups = {k: (model, k) for k in variants}
    cfg, dtype = next(iter(setups.values()))[0].cfg, jnp.float32
    print(f"{cpu_model()} | {os.cpu_count()} CPUs | jax {jax.__version__} | {cfg.name} float32 | "
          f"{args.compare}: {' vs '.join(variants)}", flush=True)
    runs = {}
    for case in args.cases.split(","):
        T, b = (int(x) for x in case.split("x"))
        tokens = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (b, T)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
        for kv in args.kv.split(","):
            policy = kvjax.get_policy(kv)
            for variant, (model, kernels) in setups.items():
                empty = lambda policy=policy, kernels=kernels, b=b, T=T: policy.make_cache(cfg, b, T + 1, dtype, kernels)
                t0 = time.perf_counter()
                compiled = kvjax.prefill.lower(model.params, tokens, positions, empty(), cfg=cfg, dtype=dtype).compile()
                runs[(kv, T, b, variant)] = dict(fn=compiled, args=(model.params, tokens, positions), empty=empty, s=[])
                print(f"compiled {kv} {T}x{b} {variant} in {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(args.rounds):
        for key, run in runs.items():
            cache = run["empty"]()
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            jax.block_until_ready(run["fn"](*run["args"], cache))
            run["s"].append(time.perf_counter() - t0)
            kv, T, b, variant = key
            print(f"round {r}: {kv} {T}x{b} {variant}: {b * T / run['s'][-1]:.1f} tokens/s", flush=True)
    base, new = variants
    print(f"\n{'kv':<8} {'tokens':>6} {'batch':>5} {base + ' tok/s':>15} {new + ' tok/s':>15} {'ratio':>10}")
    for (kv, T, b, variant), run in runs.items():
        if variant != new:
            continue
        ref, nat = runs[(kv, T, b, base)]["s"], run["s"]
        print(f"{kv:<8} {T:>6} {b:>5} {b * T / np.median(ref):>15.1f} {b * T / np.median(nat):>15.1f} "
              f"{np.median([x / y for x, y in zip(ref, nat)]):>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
