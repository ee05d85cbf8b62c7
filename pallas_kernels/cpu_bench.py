"""`python -m pallas_kernels.cpu_bench`: the CPU attention kernel against this machine's limits.

Times one decode step's attention over all layers (the C++ kernel of pallas_kernels.cpu_attention,
one call per layer inside one jitted `lax.scan`, every array [L, b, k, c, ...] read in place at the
scan's layer index, as kvjax's caches pass them) at a model's shapes (default SmolLM2-135M: 30
layers, 9 query heads, 3 KV heads, head dim 64, group size 32, 16-bit K/V and scales stored as
float16), for the part sets each policy passes:

  fp16       one float16 part holding the whole context (this step's slot masked out) + the new token
  kivi2/4    a 128-slot float16 window + the token + a packed KIVI tier (full groups) + its stage
             (float16 keys of the group being filled, values in the tier at value_offset)
  int8-sink  4 float16 sinks + the window + the token + a symmetric 8-bit tier
  kivi-k4v2  kivi2's parts with 4-bit keys and 2-bit values

`context` tokens are held in all (the token included). Per row: the bytes the call reads (every
operand byte of a layer once: codes, scales, zeros, float K/V, masks, q; and the partials written),
achieved GB/s, multiply-adds (2 h per valid slot and query head: scores and values), GFLOP/s, and
the fraction of the binding limit: the larger of bytes / copy bandwidth and multiply-adds / FMA
rate, both measured in the same run, interleaved with the kernel's rounds (cpu_limits.cc, compiled
with the kernel's flags: a STREAM copy of 256 MiB into another 256 MiB counted as bytes read +
written, and 16 independent vector multiply-add chains per thread, on `--threads` threads, default
all CPUs; the read-only rate of a vector sum is printed beside them).
A fraction above 1 means the kernel beats that model of the machine (e.g. caches that fit in L3).

Timing: every policy of a (context, batch) case is built first; then rounds, each timing the
limits and every policy in turn (several calls each). `ms` is the median over all calls; the
fraction of the limit and the ratio to fp16 are medians over the rounds of each round's own
(its time against that round's limits and that round's fp16), so that a shared machine's drift
between rounds hits both sides of each ratio alike.

    python -m pallas_kernels.cpu_bench --contexts 1024,4096,8192,32768 --batches 1,8 [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_attention

LIMITS_SOURCE = Path(__file__).with_name("cpu_limits.cc")
POLICIES = ("fp16", "kivi2", "kivi4", "int8-sink", "kivi-k4v2")
COPY_MIB = 256  # per array of the copy: far beyond any L3


@dataclasses.dataclass(frozen=True)
class Shapes:
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    group: int = 32
    window: int = 128
    sinks: int = 4


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class Limits:
    """The machine's copy bandwidth and multiply-add rate (cpu_limits.cc, the kernel's compile flags)."""

    def __init__(self, threads: int, vector: bool = True, copy_mib: int = COPY_MIB):
        cpu_attention.cache_dir().mkdir(parents=True, exist_ok=True)
        lib = ctypes.CDLL(str(cpu_attention.build_library(LIMITS_SOURCE, vector)))
        for name, args in (("kvjax_copy_seconds", [ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
                           ("kvjax_read_seconds", [ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
                           ("kvjax_fma_seconds", [ctypes.c_int64, ctypes.c_int])):
            getattr(lib, name).restype, getattr(lib, name).argtypes = ctypes.c_double, args
        self.lib, self.threads, self.floats = lib, threads, copy_mib << 18
        self.lanes, self.chains = lib.kvjax_fma_lanes(), lib.kvjax_fma_chains()
        self.fma_iterations = 1 << 20
        t = self.lib.kvjax_fma_seconds(self.fma_iterations, self.threads)  # size the loop to ~20 ms
        self.fma_iterations = max(1 << 16, int(self.fma_iterations * 0.02 / max(t, 1e-6)))

    def copy_gbs(self) -> float:
        """STREAM copy: (bytes read + bytes written) / s, median of 3, in GB/s."""
        return 2 * 4 * self.floats / self.lib.kvjax_copy_seconds(self.floats, self.threads, 3) / 1e9

    def read_gbs(self) -> float:
        return 4 * self.floats / self.lib.kvjax_read_seconds(self.floats, self.threads, 3) / 1e9

    def fma_rate(self) -> float:
        """Vector multiply-adds per second (one multiply-add = 2 flops), median of 3 runs."""
        t = float(np.median([self.lib.kvjax_fma_seconds(self.fma_iterations, self.threads) for _ in range(3)]))
        return self.fma_iterations * self.chains * self.lanes * self.threads / t


# -- the parts each policy passes ---------------------------------------------------------------

class Builder:
    """Random arrays of one case, every layer alike ([L, ...], random once: layers differ only in where they
    lie); `dry`: shapes only (jax.ShapeDtypeStruct), for the memory check."""

    def __init__(self, s: Shapes, b: int, seed: int, dry: bool = False):
        self.s, self.b, self.rng, self.dry = s, b, np.random.default_rng(seed), dry

    def _layers(self, shape, dtype, make):
        if self.dry:
            return jax.ShapeDtypeStruct((self.s.layers,) + shape, dtype)
        return jnp.asarray(np.broadcast_to(make(shape).astype(dtype), (self.s.layers,) + shape))

    def floats(self, slots: int):
        shape = (self.b, self.s.kv_heads, slots, self.s.head_dim)
        return self._layers(shape, np.float16, lambda sh: self.rng.standard_normal(sh, np.float32))

    def codes(self, slots: int, bits: int):
        shape = (self.b, self.s.kv_heads, slots, self.s.head_dim * bits // 32)
        return self._layers(shape, np.uint32, lambda sh: self.rng.integers(0, 1 << 32, sh, dtype=np.uint32))

    def side(self, *shape):
        return self._layers((self.b, self.s.kv_heads) + shape, np.float16,
                            lambda sh: 0.01 + 0.1 * self.rng.random(sh, np.float32))

    def valid(self, slots: int, count: int):
        if self.dry:
            return jax.ShapeDtypeStruct((self.b, slots), np.bool_)
        return jnp.asarray(np.broadcast_to(np.arange(slots) < count, (self.b, slots)))

    def offset(self, value: int):
        return jax.ShapeDtypeStruct((self.b,), np.int32) if self.dry else jnp.full((self.b,), value, jnp.int32)

    def float_part(self, slots: int, count: int) -> cpu_attention.Part:
        return cpu_attention.Part.floats(self.floats(slots), self.floats(slots), self.valid(slots, count), 0)

    def kivi(self, entered: int, key_bits: int, value_bits: int) -> list[cpu_attention.Part]:
        """A KIVI tier that `entered` tokens entered: its full groups packed, the rest in the stage."""
        G, h = self.s.group, self.s.head_dim
        slots = max(G, -(-entered // G) * G)
        full, staged = entered // G * G, entered % G
        packed = cpu_attention.packed_part(
            self.codes(slots, key_bits), self.side(slots // G, h), self.side(slots // G, h),
            self.codes(slots, value_bits), self.side(slots, h // G), self.side(slots, h // G),
            self.valid(slots, full), 0, key_bits=key_bits, value_bits=value_bits)
        stage = dataclasses.replace(packed, keys=self.floats(G), key_scale=None, key_zero=None,
                                    key_bits=cpu_attention.FLOATS, valid=self.valid(G, staged),
                                    value_offset=self.offset(min(full, slots - G)))
        return [packed, stage]

    def symmetric(self, entered: int, bits: int) -> list[cpu_attention.Part]:
        slots = max(1, entered)
        return [cpu_attention.packed_part(self.codes(slots, bits), self.side(slots, 1), None, self.codes(slots, bits),
                                          self.side(slots, 1), None, self.valid(slots, entered), 0, key_bits=bits,
                                          value_bits=bits, symmetric=True)]


def policy_parts(name: str, s: Shapes, b: int, context: int, seed: int = 0, dry: bool = False):
    """The parts of one layer for `context` held tokens (this step's included), as the policy's cache passes
    them (their arrays hold every layer; `dry`: shapes only)."""
    B = Builder(s, b, seed, dry)
    token = B.float_part(1, 1)
    if name == "fp16":  # DenseCache through the kernel: the whole cache, this step's slot masked out
        return [B.float_part(context, context - 1), token]
    window = B.float_part(s.window, min(context, s.window) - 1)
    if name == "int8-sink":
        return [B.float_part(s.sinks, s.sinks), window, token] + B.symmetric(context - s.sinks - s.window, 8)
    bits = {"kivi2": (2, 2), "kivi4": (4, 4), "kivi-k4v2": (4, 2)}[name]
    return [window, token] + B.kivi(context - s.window, *bits)


def part_bytes(p: cpu_attention.Part) -> int:
    """Bytes one call reads of this part in one layer (every slot of its arrays; values from value_offset)."""
    nbytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize
    per_layer = lambda x: 0 if x is None else nbytes(x) // x.shape[0]
    keys = per_layer(p.keys) + per_layer(p.key_scale) + per_layer(p.key_zero)
    values = per_layer(p.values) + per_layer(p.value_scale) + per_layer(p.value_zero)
    if p.value_offset is not None:  # only the key slots' values
        values = values * p.keys.shape[3] // p.values.shape[3] + nbytes(p.value_offset)
    return keys + values + nbytes(p.valid)


def case_stats(s: Shapes, b: int, parts) -> tuple[int, int]:
    """(bytes, multiply-adds) of one decode step over all layers."""
    q_and_out = b * s.heads * s.head_dim * 4 + b * s.heads * (s.head_dim + 2) * 4
    nbytes = sum(part_bytes(p) for p in parts) + q_and_out
    valid_slots = sum(int(np.asarray(p.valid).sum()) for p in parts)  # over rows
    macs = 2 * s.head_dim * s.heads * valid_slots  # per query head and slot: h for the score, h for the values
    return s.layers * nbytes, s.layers * macs


@functools.partial(jax.jit, static_argnames=("group_size", "portable"))
def decode_step(qs, parts, *, group_size: int, portable: bool = False):
    """One decode step's attention: for each layer l, the kernel over every part's layer l."""
    def body(_, xs):
        q, layer = xs
        here = [dataclasses.replace(p, layer=layer) for p in parts]
        return None, cpu_attention.attention_partials(q, here, group_size=group_size, portable=portable)
    return jax.lax.scan(body, None, (qs, jnp.arange(qs.shape[0], dtype=jnp.int32)))[1]


# -- running -----------------------------------------------------------------------------------

def run_case(s: Shapes, b: int, context: int, policies, limits: Limits, rounds: int, portable: bool, budget_s: float):
    cases = {}
    for name in policies:
        parts = policy_parts(name, s, b, context, seed=zlib.crc32(f"{name} {b} {context}".encode()))
        qs = jnp.asarray(np.random.default_rng(1).standard_normal((s.layers, b, s.heads, s.head_dim), np.float32))
        fn = functools.partial(decode_step, group_size=s.group, portable=portable)
        jax.block_until_ready(fn(qs, parts))  # compile, warm up
        t0 = time.perf_counter()
        jax.block_until_ready(fn(qs, parts))
        est = time.perf_counter() - t0
        nbytes, macs = case_stats(s, b, parts)
        cases[name] = dict(fn=fn, args=(qs, parts), reps=max(1, math.ceil(budget_s / max(est, 1e-4))), times=[],
                           bytes=nbytes, macs=macs)
    rounds_out = []  # per round: the limits, then each policy's median time over its calls
    for _ in range(rounds):
        r = dict(copy=limits.copy_gbs(), fma=limits.fma_rate(), read=limits.read_gbs(), ms={})
        for name, c in cases.items():
            times = []
            for _ in range(c["reps"]):
                t0 = time.perf_counter()
                jax.block_until_ready(c["fn"](*c["args"]))
                times.append(time.perf_counter() - t0)
            c["times"] += times
            r["ms"][name] = 1e3 * float(np.median(times))
        rounds_out.append(r)
    median = lambda xs: float(np.median(list(xs)))
    copy_gbs, read_gbs, fma_rate = (median(r[k] for r in rounds_out) for k in ("copy", "read", "fma"))

    def limit_ms(c, r):  # the binding limit under round r's limits: (ms, bound)
        mem, fma = c["bytes"] / (r["copy"] * 1e6), c["macs"] / r["fma"] * 1e3
        return (mem, "memory") if mem >= fma else (fma, "fma")

    rows = []
    for name, c in cases.items():
        t = float(np.median(c["times"]))
        limit, bound = limit_ms(c, dict(copy=copy_gbs, fma=fma_rate))
        rows.append(dict(policy=name, context=context, batch=b, ms=1e3 * t, bytes=c["bytes"], GBps=c["bytes"] / t / 1e9,
                         macs=c["macs"], GFLOPs=2 * c["macs"] / t / 1e9, bound=bound, limit_ms=limit,
                         # paired by round: each round's time against that round's limits and fp16
                         fraction=median(limit_ms(c, r)[0] / r["ms"][name] for r in rounds_out),
                         vs_fp16=median(r["ms"]["fp16"] / r["ms"][name] for r in rounds_out) if "fp16" in cases else None,
                         copy_GBps=copy_gbs, read_GBps=read_gbs, fma_GFLOPs=2 * fma_rate / 1e9, samples=len(c["times"]),
                         rounds=[dict(ms=r["ms"][name], copy_GBps=r["copy"], fma_GFLOPs=2 * r["fma"] / 1e9)
                                 for r in rounds_out]))
    return rows


def _ints(text):
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser():
    p = argparse.ArgumentParser(prog="python -m pallas_kernels.cpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=_ints, default=[1024, 4096, 8192, 32768], help="held tokens, comma-separated")
    p.add_argument("--batches", type=_ints, default=[1, 8], help="comma-separated")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated: {', '.join(POLICIES)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    p.add_argument("--seconds", type=float, default=0.15, help="time per policy per round")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the copy and FMA loops")
    p.add_argument("--copy-mib", type=int, default=COPY_MIB, help="MiB per array of the copy and read loops")
    p.add_argument("--portable", action="store_true", help="the kernel and the limits without vector extensions")
    p.add_argument("--memory-fraction", type=float, default=0.5,
                   help="skip a case whose inputs need more than this share of MemAvailable")
    p.add_argument("--json", default=None, help="write all rows here")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    policies = [x for x in args.policies.split(",") if x]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        print(f"error: unknown policies {unknown}; known: {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    if jax.default_backend() != "cpu" or not cpu_attention.available():
        print(f"error: no CPU kernel here ({cpu_attention.unavailable_reason() or jax.default_backend()})",
              file=sys.stderr)
        return 2
    s = Shapes()
    limits = Limits(args.threads, vector=not args.portable, copy_mib=args.copy_mib)
    flags = " ".join(f for f in cpu_attention.vector_flags(not args.portable) if "prefer" not in f) or "portable"
    print(f"{cpu_model()} | {os.cpu_count()} CPUs | jax {jax.__version__} | kernel flags: {flags} | "
          f"limits on {args.threads} threads", flush=True)
    head = (f"{'policy':<10} {'ctx':>6} {'b':>2} {'ms':>8} {'MB read':>8} {'GB/s':>6} {'GMAC':>6} {'GFLOP/s':>8} "
            f"{'bound':>6} {'limit ms':>8} {'of limit':>8} {'vs fp16':>7}")
    rows = []
    for b in args.batches:
        for context in args.contexts:
            need = s.layers * sum(part_bytes(p) for n in policies for p in policy_parts(n, s, b, context, dry=True))
            if need > args.memory_fraction * mem_available():
                print(f"skipped: context {context}, batch {b}: its inputs need {need / 2**30:.1f} GiB, more than "
                      f"{args.memory_fraction:.0%} of the {mem_available() / 2**30:.1f} GiB available", flush=True)
                continue
            case = run_case(s, b, context, policies, limits, args.rounds, args.portable, args.seconds)
            r = case[0]
            print(f"context {context}, batch {b}: limits (medians of the case's rounds) copy {r['copy_GBps']:.1f} GB/s "
                  f"(read + write), read {r['read_GBps']:.1f} GB/s, FMA {r['fma_GFLOPs']:.0f} GFLOP/s\n{head}", flush=True)
            for r in case:
                rows.append(r)
                vs = "" if r["vs_fp16"] is None else f"{r['vs_fp16']:.2f}x"
                print(f"{r['policy']:<10} {context:>6} {b:>2} {r['ms']:>8.2f} {r['bytes'] / 1e6:>8.1f} {r['GBps']:>6.1f} "
                      f"{r['macs'] / 1e9:>6.3f} {r['GFLOPs']:>8.1f} {r['bound']:>6} {r['limit_ms']:>8.2f} "
                      f"{r['fraction']:>7.0%} {vs:>7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__, "flags": flags,
                       "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
