"""`python -m kvjax.bench`: prefill tokens/s and decode ms/token at several contexts and policies.

With a real model (`--model`, default: the embedded one) prompts are random token ids (speed
does not depend on their values), prefilled through each policy, then a chunk of decode steps
is timed after a warm-up. With `--preset NAME` the weights are random with the real shapes of
that model and the cache is filled directly with `context` random tokens in the state decoding
would have left (decode speed depends on neither weights nor K/V values; a 32k-token
teacher-forced prefill would not fit in memory): only decode is timed.

    python -m kvjax.bench --contexts 128,1024,4096 --decode-steps 32
    python -m kvjax.bench --preset SmolLM-360M --kv fp16,kivi4,kivi2,mixed@3 --contexts 1024,8192,32768
    python -m kvjax.bench --preset SmolLM-360M --kv fp16,kivi2 --contexts 4096 --kv-budget-gib 8

`--kv-budget-gib` gives each policy the largest batch whose KV cache (sized for the largest
context plus the decode steps; weights not counted) fits the budget: KIVI's "larger batches".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import get_preset
from kvjax.errors import KvjaxError
from kvjax.generation import decode_chunk, default_dtype, prefill, start_state
from kvjax.loading import LoadedModel, load_model
from kvjax.model import DTYPES, init_params
from kvjax.policies import add_policy_flags, policies_from_flags
from kvjax.sampling import SamplingConfig

GREEDY = SamplingConfig()


@functools.partial(jax.jit, static_argnames=("policy", "cfg", "batch", "context", "capacity", "dtype", "kernels"))
def filled_cache(key, *, policy, cfg, batch: int, context: int, capacity: int, dtype, kernels="auto"):
    """A cache of `policy` holding `context` random tokens per sequence, as decoding leaves it."""
    cache = policy.make_cache(cfg, batch, capacity, dtype, kernels)
    kk, kv = jax.random.split(key)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, context, cfg.head_dim)
    k_all, v_all = jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    return cache.filled(k_all, v_all, positions)


def bench_context(model, context: int, decode_steps: int, batch: int, kv, dtype, repeats: int, synthetic: bool,
                  kernels="auto"):
    """-> (prefill tokens/s or None, decode ms/token, KV bytes) for `context` tokens per sequence."""
    cfg = model.cfg
    capacity = context + decode_steps + 1
    if not synthetic:
        rng = np.random.default_rng(context)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, context)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))

    def run_once():
        t_prefill = None
        if synthetic:
            cache = filled_cache(jax.random.PRNGKey(context), policy=kv, cfg=cfg, batch=batch, context=context,
                                 capacity=capacity, dtype=dtype, kernels=kernels)
            logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
        else:
            cache = kv.make_cache(cfg, batch, capacity, dtype, kernels)
            t0 = time.perf_counter()
            logits, cache = prefill(model.params, tokens, positions, cache, cfg=cfg, dtype=dtype)
            logits.block_until_ready()
            t_prefill = time.perf_counter() - t0
        # eos_id -1 never matches: every sequence decodes all steps.
        state = start_state(logits, cache, jax.random.PRNGKey(0), decode_steps + 1, GREEDY, -1)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = decode_chunk(model.params, state, -1, cfg=cfg, dtype=dtype, sampling=GREEDY,
                             chunk=decode_steps)
        state.step.block_until_ready()
        t_decode = time.perf_counter() - t0
        return t_prefill, t_decode, state.cache.nbytes

    run_once()  # compile and warm up
    runs = [run_once() for _ in range(repeats)]
    t_prefill = None if synthetic else float(np.median([r[0] for r in runs]))
    t_decode = float(np.median([r[1] for r in runs]))
    return (None if synthetic else batch * context / t_prefill), 1e3 * t_decode / decode_steps, runs[0][2]


def cache_bytes(policy, cfg, batch: int, capacity: int, dtype) -> int:
    """Bytes of an empty cache of `policy` (shapes only, nothing allocated)."""
    shapes = jax.eval_shape(lambda: policy.make_cache(cfg, batch, capacity, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def largest_batch(policy, cfg, capacity: int, dtype, budget_bytes: int) -> int:
    """The most sequences of `capacity` tokens whose cache fits `budget_bytes` (cache bytes are affine in batch)."""
    one, two = cache_bytes(policy, cfg, 1, capacity, dtype), cache_bytes(policy, cfg, 2, capacity, dtype)
    per_sequence, fixed = two - one, 2 * one - two
    return max(0, (budget_bytes - fixed) // per_sequence)


def random_model(preset: str, context: int, dtype) -> LoadedModel:
    """Random weights of a preset's shapes, its context stretched to `context` (speed only)."""
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, context))
    return LoadedModel(cfg, init_params(cfg, jax.random.PRNGKey(0), dtype), None, f"random {preset}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvjax.bench", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="model to load (default: the embedded SmolLM2-135M)")
    source.add_argument("--preset", default=None, help="random weights of this preset's shapes; decode only")
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--decode-steps", type=int, default=32)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1)
    batch.add_argument("--kv-budget-gib", type=float, default=None,
                       help="per policy, the largest batch whose KV cache at the largest context fits this many GiB")
    p.add_argument("--repeats", type=int, default=3)
    add_policy_flags(p)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--json", default=None, help="append one JSON line per (policy, context) to this file")
    args = p.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        dtype_name = args.dtype or default_dtype()
        policies = policies_from_flags(args)
        names = [p.name for p in policies]
        last = max(contexts) + args.decode_steps + 1
        if args.preset:
            model = random_model(args.preset, last, DTYPES[dtype_name])
        else:
            model = load_model(args.model, DTYPES[dtype_name])
            if last > model.cfg.max_position_embeddings:
                raise KvjaxError(f"context {max(contexts)} + decode steps exceeds the model's "
                                 f"{model.cfg.max_position_embeddings} tokens")
        for kv in policies:
            kv.check(model.cfg)
        batches = [args.batch] * len(policies)
        if args.kv_budget_gib is not None:
            budget = int(args.kv_budget_gib * 2**30)
            batches = [largest_batch(kv, model.cfg, last, DTYPES[dtype_name], budget) for kv in policies]
            if min(batches) < 1:
                raise KvjaxError(f"one sequence of {last} tokens does not fit {args.kv_budget_gib} GiB of KV cache "
                                 f"under {names[batches.index(min(batches))]}")
    except (KvjaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    model_name = model.source if args.preset else model.cfg.name
    common = {"model": model_name, "device": device.device_kind,
              "platform": device.platform, "jax": jax.__version__, "dtype": dtype_name,
              "kv_budget_gib": args.kv_budget_gib, "decode_steps": args.decode_steps, "date": datetime.date.today().isoformat(),
              "command": "python -m kvjax.bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"model {model_name} | {device.platform} {device.device_kind} | "
          f"{platform.processor() or platform.machine()} | jax {jax.__version__} | dtype {dtype_name} | "
          + (f"KV budget {args.kv_budget_gib} GiB" if args.kv_budget_gib else f"batch {args.batch}"))
    print(f"{'kv':<10} {'batch':>6} {'context':>8} {'prefill tok/s':>14} {'decode ms/tok':>14} {'decode tok/s':>13} "
          f"{'KV MiB':>8}")
    for name, kv, batch in zip(names, policies, batches):
        for context in contexts:
            tps, ms, kv_bytes = bench_context(model, context, args.decode_steps, batch, kv,
                                              DTYPES[dtype_name], args.repeats, synthetic=bool(args.preset),
                                              kernels=args.kernels)
            prefill_col = "-" if tps is None else f"{tps:.1f}"
            print(f"{name:<10} {batch:>6} {context:>8} {prefill_col:>14} {ms:>14.2f} {batch * 1e3 / ms:>13.1f} "
                  f"{kv_bytes / 2**20:>8.1f}", flush=True)
            if args.json:
                row = {**common, "kv": name, "batch": batch, "context": context, "prefill_tokens_per_s": tps,
                       "decode_ms_per_token": ms, "decode_tokens_per_s": batch * 1e3 / ms, "kv_bytes": kv_bytes}
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
