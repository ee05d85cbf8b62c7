"""What compiling `generate`'s programs costs per policy: seconds, and the process's peak resident memory.

For each policy, in a fresh process (a compiler's peak memory is the process's, and XLA keeps what it
compiled): the default model loaded, then `kvjax.generation.compile_programs` for a batch of prompts,
from shapes alone (nothing prefilled), as `generate` does before it makes the cache. Prints one row per
policy: the layer scans of its decode step and of its prefill (`Layout.segments`,
`Layout.store_segments`), the compile seconds, and the peak resident memory before and after.

    python experiments/compile_cost.py --kv kivi2,learned-alloc@2.5 --batch 8 --tokens 7900
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ONE = "one"  # run one policy in this process (the child's mode)


def measure(kv: str, batch: int, tokens: int) -> dict:
    import jax.numpy as jnp

    import kvjax
    from kvjax import generation, memory
    from kvjax.sampling import SamplingConfig

    model = kvjax.load_model()
    policy = kvjax.get_policy(kv)
    new = 4  # tokens generated; decode steps per dispatch: all of them, generate's default
    layout = policy.layout(model.cfg, tokens + new)
    ids = jnp.zeros((batch, tokens), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    before = memory.peak()
    start = time.perf_counter()
    generation.compile_programs(model.params, model.cfg, policy, ids, positions, tokens + new, new, jnp.float32,
                                "auto", SamplingConfig(), 0, new)
    return {"kv": kv, "batch": batch, "tokens": tokens, "compile_s": round(time.perf_counter() - start, 1),
            "decode_scans": len(layout.segments) if layout else 1,
            "prefill_scans": len(layout.store_segments) if layout else 1,
            "peak_before_gib": round(before / memory.GIB, 2), "peak_gib": round(memory.peak() / memory.GIB, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", default="kivi2,learned-alloc@2.5")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=7900)
    p.add_argument(f"--{ONE}", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if getattr(args, ONE):
        print(json.dumps(measure(args.kv, args.batch, args.tokens)))
        return
    from pallas_kernels.cpu_bench import cpu_model
    print(f"{cpu_model()} | {os.cpu_count()} CPUs | {args.batch} x {args.tokens} tokens")
    print(f"{'kv':<22} {'decode scans':>12} {'prefill scans':>13} {'compile s':>9} {'peak GiB':>9} {'before':>7}")
    for kv in args.kv.split(","):
        out = subprocess.run([sys.executable, __file__, f"--{ONE}", "--kv", kv, "--batch", str(args.batch),
                              "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{kv:<22} {row['decode_scans']:>12} {row['prefill_scans']:>13} {row['compile_s']:>9} "
              f"{row['peak_gib']:>9} {row['peak_before_gib']:>7}", flush=True)


if __name__ == "__main__":
    main()
