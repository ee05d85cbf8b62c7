"""`python -m kvjax.bench`: prefill tokens/s and decode ms/token at several contexts.

Prompts are random token ids (speed does not depend on their values). Each context
is compiled once, then prefill and a chunk of decode steps are timed after a warm-up.

    python -m kvjax.bench --contexts 128,1024,4096 --decode-steps 32
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import KvjaxError
from kvjax.generation import decode_chunk, default_dtype, prefill, start_state
from kvjax.loading import load_model
from kvjax.model import DTYPES
from kvjax.policies import add_policy_flags, make_cache, policy_from_flags
from kvjax.sampling import SamplingConfig

GREEDY = SamplingConfig()


def bench_context(model, context: int, decode_steps: int, batch: int, kv: str, dtype, repeats: int):
    """-> (prefill tokens/s, decode ms/token, KV bytes) for prompts of `context` tokens."""
    cfg = model.cfg
    rng = np.random.default_rng(context)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, context)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    capacity = context + decode_steps + 1

    def run_once():
        cache = make_cache(kv, cfg, batch, capacity, dtype)
        t0 = time.perf_counter()
        logits, cache = prefill(model.params, tokens, positions, cache, cfg=cfg, dtype=dtype)
        logits.block_until_ready()
        t_prefill = time.perf_counter() - t0
        # eos_id -1 never matches: every sequence decodes all steps.
        state = start_state(logits, cache, jax.random.PRNGKey(0), decode_steps + 1, GREEDY, -1)
        t0 = time.perf_counter()
        state = decode_chunk(model.params, state, -1, cfg=cfg, dtype=dtype, sampling=GREEDY,
                             chunk=decode_steps)
        state.step.block_until_ready()
        t_decode = time.perf_counter() - t0
        return t_prefill, t_decode, state.cache.nbytes

    run_once()  # compile and warm up
    runs = [run_once() for _ in range(repeats)]
    t_prefill = float(np.median([r[0] for r in runs]))
    t_decode = float(np.median([r[1] for r in runs]))
    return batch * context / t_prefill, 1e3 * t_decode / decode_steps, runs[0][2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvjax.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    add_policy_flags(p)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    args = p.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        dtype_name = args.dtype or default_dtype()
        kv = policy_from_flags(args)
        model = load_model(args.model, DTYPES[dtype_name])
        if max(contexts) + args.decode_steps + 1 > model.cfg.max_position_embeddings:
            raise KvjaxError(f"context {max(contexts)} + decode steps exceeds the model's "
                             f"{model.cfg.max_position_embeddings} tokens")
    except (KvjaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    print(f"model {model.cfg.name} | {device.platform} {device.device_kind} | {platform.processor() or platform.machine()} "
          f"| jax {jax.__version__} | dtype {dtype_name} | kv {args.kv} | batch {args.batch}")
    print(f"{'context':>8} {'prefill tok/s':>14} {'decode ms/tok':>14} {'decode tok/s':>13} {'KV MiB':>8}")
    for context in contexts:
        tps, ms, kv_bytes = bench_context(model, context, args.decode_steps, args.batch, kv,
                                          DTYPES[dtype_name], args.repeats)
        print(f"{context:>8} {tps:>14.1f} {ms:>14.2f} {args.batch * 1e3 / ms:>13.1f} {kv_bytes / 2**20:>8.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
