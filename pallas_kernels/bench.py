"""`python -m pallas_kernels.bench`: one layer's decode attention, packed 2/4-bit tiers vs FP16.

For the KV shapes of real models, at several contexts and batch sizes, one decode step (one
query token per sequence) over a cache of `context` tokens per sequence:

  kivi2 / kivi4  the fused Pallas kernel over one packed KIVI tier holding the whole context
  xla-fp16       `jax.nn.dot_product_attention` over bf16 K/V (XLA)
  pallas-fp16    jax's own Pallas GPU decode attention (jax.experimental.pallas.ops.gpu), bf16 K/V

Per case: µs per call, the bytes the call must read (each input once), achieved GB/s, its share
of the copy bandwidth measured in the same run (bytes read + written by a 1 GiB device copy),
and the speedup of each quantized kernel over both FP16 paths.

Timing: the call runs once on each of R input sets inside one jitted function (no host dispatch
between calls; R sets exceed the 50 MB L2 where memory allows), median over repeats.

    python -m pallas_kernels.bench --models SmolLM-360M,SmolLM-1.7B --contexts 1024,4096,16384,32768 \\
        --batches 1,16,64 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from typing import NamedTuple

from pallas_kernels.decode_attention import DecodeBlocks, auto_blocks, tier_attention_partials

GROUP = 32


class Shapes(NamedTuple):
    """One layer's attention shapes of a model (from its Hugging Face config.json)."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


MODELS = {s.name: s for s in (Shapes("SmolLM-135M", 9, 3, 64), Shapes("SmolLM-360M", 15, 5, 64),
                              Shapes("SmolLM-1.7B", 32, 32, 64))}


def model_shapes(name: str) -> Shapes:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]
L2_BYTES = 64 << 20  # rotate input sets until they exceed this (H100 L2: 50 MB)
MAX_SET_BYTES = 6 << 30  # memory for all input sets of one path


def time_us(fn, sets, repeats: int) -> float:
    """Median µs per call of fn(*args) over the rotating argument sets."""
    run = jax.jit(lambda all_sets: [fn(*args) for args in all_sets])
    jax.block_until_ready(run(sets))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(sets))
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times)) / len(sets)


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 1 GiB device copy, counting bytes read plus written."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 28,), jnp.float32)
    us = time_us(lambda a: a + 1.0, [(x,)], repeats)
    return 2 * x.nbytes / us / 1e3


def n_sets(set_bytes: int) -> int:
    return int(max(1, min(16, math.ceil(L2_BYTES / set_bytes), MAX_SET_BYTES // set_bytes)))


def tier_inputs(key, b, k, n, c, h, bits):
    """Random q [b, n, h] bf16 and a full packed tier (uint32 codes, bf16 scales/zeros)."""
    ks = jax.random.split(key, 7)
    w = h * bits // 32
    codes = lambda i: jax.random.bits(ks[i], (b, k, c, w), jnp.uint32)
    scale = lambda i, shape: (0.01 + 0.1 * jax.random.uniform(ks[i], shape)).astype(jnp.bfloat16)
    q = jax.random.normal(ks[0], (b, n, h), jnp.bfloat16)
    return (q, codes(1), scale(2, (b, k, c // GROUP, h)), scale(3, (b, k, c // GROUP, h)), codes(4),
            scale(5, (b, k, c, h // GROUP)), scale(6, (b, k, c, h // GROUP)), jnp.full((b,), c, jnp.int32))


def tier_bytes(b, k, n, c, h, bits) -> int:
    codes = 2 * b * k * c * h * bits // 8
    scales = 2 * 2 * b * k * (c // GROUP) * h + 2 * 2 * b * k * c * (h // GROUP)
    return codes + scales + 2 * b * n * h


def dense_inputs(key, b, k, n, c, h, layout: str):
    """q bf16 and K/V bf16, [b, c, k, h] ('bskh', XLA) or [b, k, c, h] ('bksh', Pallas)."""
    kq, kk, kv = jax.random.split(key, 3)
    shape = (b, c, k, h) if layout == "bskh" else (b, k, c, h)
    return (jax.random.normal(kq, (b, n, h), jnp.bfloat16), jax.random.normal(kk, shape, jnp.bfloat16),
            jax.random.normal(kv, shape, jnp.bfloat16))


def xla_fp16(q, k, v):
    return jax.nn.dot_product_attention(q[:, None], k, v)[:, 0]  # q [b, 1, n, h], k/v [b, s, k, h]


def pallas_fp16(q, k, v, k_splits: int):
    """jax's Pallas GPU decode attention on [b, k, s, h] K/V (no transposes), vmapped as its gqa does."""
    from jax.experimental.pallas.ops.gpu import decode_attention as jda

    b, n, h = q.shape
    heads = k.shape[1]
    inner = functools.partial(jda.decode_attn_unbatched, sm_scale=h ** -0.5, block_h=16, block_k=128,
                              k_splits=k_splits, num_warps=None, num_stages=2, grid=None, interpret=False,
                              debug=False, return_residuals=False, normalize_output=True)
    out = jax.vmap(jax.vmap(inner))(q.reshape(b, heads, n // heads, h), k, v, None, None)
    return out.reshape(b, n, h)


def bench_case(cfg, b, c, repeats, copy_gbs, blocks: DecodeBlocks | None):
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    row = {"model": cfg.name, "batch": b, "context": c}
    dense_bytes = 2 * b * k * c * h * 2 + 2 * b * n * h
    sets = n_sets(dense_bytes)
    keys = jax.random.split(jax.random.PRNGKey(b * 100003 + c), sets)
    xs = [dense_inputs(kk, b, k, n, c, h, "bskh") for kk in keys]
    row["xla-fp16"] = time_us(xla_fp16, xs, repeats)
    del xs
    ps = [dense_inputs(kk, b, k, n, c, h, "bksh") for kk in keys]
    k_splits = max(1, min(16, c // 256))
    row["pallas-fp16"] = time_us(functools.partial(pallas_fp16, k_splits=k_splits), ps, repeats)
    del ps
    row["fp16 bytes"] = dense_bytes
    for bits in (2, 4):
        nbytes = tier_bytes(b, k, n, c, h, bits)
        sets = n_sets(nbytes)
        chosen = blocks or auto_blocks(b, k, c)
        ts = [tier_inputs(kk, b, k, n, c, h, bits) for kk in jax.random.split(jax.random.PRNGKey(c + bits), sets)]
        fn = functools.partial(tier_attention_partials, bits=bits, group_size=GROUP, blocks=chosen)
        try:
            us = time_us(fn, ts, repeats)
        except Exception as e:  # any failure: report the case, keep the table going
            print(f"  kivi{bits} {cfg.name} b{b} c{c} {chosen}: {str(e).splitlines()[0][:120]}")
            us = float("nan")
        row[f"kivi{bits}"], row[f"kivi{bits} bytes"] = us, nbytes
        row[f"kivi{bits} GB/s"] = nbytes / us / 1e3
        row[f"kivi{bits} %copy"] = 100 * row[f"kivi{bits} GB/s"] / copy_gbs
        row[f"kivi{bits} blocks"] = f"B{chosen.block_slots} S{chosen.num_splits} w{chosen.num_warps}"
    return row


def sweep(cfg, b, c, repeats):
    """µs of the 2-bit kernel for several tilings (for choosing `auto_blocks`)."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sets = n_sets(tier_bytes(b, k, n, c, h, 2))
    ts = [tier_inputs(kk, b, k, n, c, h, 2) for kk in jax.random.split(jax.random.PRNGKey(7), sets)]
    out = []
    variants = [DecodeBlocks(block_slots=B, num_splits=S, num_warps=w, num_stages=st) for B in (32, 64, 128)
                for S in (1, 8, 32, 64) for w in (4, 8) for st in (1, 2) if c // S >= B]
    for blocks in variants:
        fn = functools.partial(tier_attention_partials, bits=2, group_size=GROUP, blocks=blocks)
        try:
            out.append((time_us(fn, ts, repeats), blocks))
        except Exception as e:  # any failure: a tiling the GPU cannot run (shared memory)
            print(f"  {blocks}: {str(e).splitlines()[0][:100]}")
    out.sort(key=lambda x: x[0])
    name = lambda d: f"B{d.block_slots} S{d.num_splits} w{d.num_warps} st{d.num_stages}"
    auto = auto_blocks(b, k, c)
    print(f"sweep {cfg.name} b{b} c{c} (auto {name(auto)}): "
          + ", ".join(f"{name(d)}: {us:.1f}" for us, d in out[:8])
          + " | auto: " + ", ".join(f"{us:.1f}" for us, d in out if d == auto), flush=True)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise ValueError(message)


def positive_ints(text):
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise ValueError
    return values


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pallas_kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="SmolLM-360M,SmolLM-1.7B", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--contexts", type=positive_ints, default=[1024, 4096, 16384, 32768], help="comma-separated slot counts")
    p.add_argument("--batches", type=positive_ints, default=[1, 16, 64], help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per case (median)")
    p.add_argument("--sweep", default="", help="model:batch:context[,...] to sweep tilings for")
    p.add_argument("--json", default=None, help="write all rows here")
    return p


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        models = [model_shapes(m) for m in args.models.split(",")]
        if args.repeats < 1:
            raise ValueError(f"argument --repeats: must be >= 1, got {args.repeats}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.default_backend() != "gpu":
        print("error: the kernel benchmark needs a GPU (the kernels run compiled only there)", file=sys.stderr)
        return 2
    contexts, batches = args.contexts, args.batches
    dev = jax.devices()[0]
    copy_gbs = copy_bandwidth(args.repeats)
    print(f"{dev.device_kind} | jax {jax.__version__} | copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    for spec in filter(None, args.sweep.split(",")):
        name, b, c = spec.split(":")
        sweep(model_shapes(name), int(b), int(c), args.repeats)
    rows = []
    head = (f"{'model':<12} {'b':>3} {'ctx':>6} {'xla-fp16':>9} {'pl-fp16':>9} {'kivi4':>8} {'kivi2':>8} "
            f"{'2b GB/s':>8} {'2b %copy':>8} {'2b/xla':>7} {'2b/pl':>6} {'4b/xla':>7}  (µs per call)")
    print(head, flush=True)
    for cfg in models:
        for b in batches:
            for c in contexts:
                if 2 * b * cfg.num_kv_heads * c * cfg.head_dim * 2 > MAX_SET_BYTES:
                    continue  # one FP16 input set alone is too large
                r = bench_case(cfg, b, c, args.repeats, copy_gbs, None)
                rows.append(r)
                print(f"{cfg.name:<12} {b:>3} {c:>6} {r['xla-fp16']:>9.1f} {r['pallas-fp16']:>9.1f} "
                      f"{r['kivi4']:>8.1f} {r['kivi2']:>8.1f} {r['kivi2 GB/s']:>8.0f} {r['kivi2 %copy']:>7.0f}% "
                      f"{r['xla-fp16'] / r['kivi2']:>6.2f}x {r['pallas-fp16'] / r['kivi2']:>5.2f}x "
                      f"{r['xla-fp16'] / r['kivi4']:>6.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "copy_GBps": copy_gbs, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
