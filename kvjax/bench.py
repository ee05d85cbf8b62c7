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

`--memory` runs each policy and context in a process of its own, prefilled for real (random
weights too with --preset), and reports the process's peak memory split into what it held before
(the model and the runtime), its KV cache and the working memory above both, beside
kvjax.generation.estimate_memory; `--memory-budget-gib B` gives each policy the largest batch whose
whole process is estimated to fit B GiB and measures it (whole processes, not caches alone):

    python -m kvjax.bench --memory --kv fp16,kivi2 --contexts 7900 --batch 8
    python -m kvjax.bench --memory --memory-budget-gib 4 --kv fp16,kivi2,learned-alloc@2.5 --contexts 4096
At each context the policies run in turn, one run each per round (`--repeats` rounds, after a
warm-up), and the median is reported: on a machine whose speed drifts, ratios within one command
stay fair.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import multiprocessing
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from kvjax import cli, memory, sharding
from kvjax.cache import KVCache
from kvjax.config import PRESETS, get_preset
from kvjax.errors import KvjaxError
from kvjax.flags import (add_devices_flag, add_kernels_flag, add_policy_flags, add_weights_flag, kernels_from_flags,
                         mesh_from_flags, policies_from_flags, weights_from_flags)
from kvjax.generation import (compile_programs, decode_chunk, default_dtype, estimate_memory, programs,
                              start_state, state_specs)
from kvjax.loading import LoadedModel, load_model, read_config, resolve_model, weight_bytes
from kvjax.model import DTYPES, init_params
from kvjax.policies import cache_bytes
from pallas_kernels import cpu_bench
from kvjax.sampling import SamplingConfig
from kvjax.weights import Kind, Weights, as_blocks, as_blocks_bytes, step_weight_bytes

GREEDY = SamplingConfig()


FILL_ROWS = 4  # sequences filled with their own random K/V; a larger batch repeats them


def filled_cache(key, *, policy, cfg, batch: int, context: int, capacity: int, dtype, kernels="auto", kv_dtype=None):
    """A cache of `policy` holding `context` random tokens per sequence, as decoding leaves it.

    Decode speed depends on neither K nor V values, so a batch above FILL_ROWS repeats the first
    FILL_ROWS sequences (the random float32 K/V of every layer of a large batch would not fit in memory)."""
    rows = min(batch, FILL_ROWS)
    cache = _filled_rows(key, policy=policy, cfg=cfg, batch=rows, context=context, capacity=capacity, dtype=dtype,
                         kernels=kernels, kv_dtype=kv_dtype)
    if rows == batch:
        return cache
    specs = sharding.row_specs(lambda n: policy.make_cache(cfg, n, capacity, dtype, kernels, kv_dtype))
    repeat = jnp.arange(batch) % rows
    tile = lambda spec, x: jnp.take(x, repeat, axis=tuple(spec).index(sharding.DATA)) if sharding.DATA in spec else x
    return jax.tree.map(tile, specs, cache, is_leaf=lambda spec: isinstance(spec, jax.sharding.PartitionSpec))


@functools.partial(jax.jit, static_argnames=("policy", "cfg", "batch", "context", "capacity", "dtype", "kernels",
                                             "kv_dtype"))
def _filled_rows(key, *, policy, cfg, batch: int, context: int, capacity: int, dtype, kernels, kv_dtype):
    cache = policy.make_cache(cfg, batch, capacity, dtype, kernels, kv_dtype)
    kk, kv = jax.random.split(key)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, context, cfg.head_dim)
    k_all, v_all = jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    return cache.filled(k_all, v_all, positions)


def context_runner(model, context: int, decode_steps: int, batch: int, kv, dtype, synthetic: bool, kernels="auto",
                   kv_dtype=None, mesh=None):
    """-> run(): one measurement of `kv` at `context` tokens per sequence, `batch` sequences on each
    device of `mesh` (kvjax.sharding): (prefill seconds or None, decode seconds for `decode_steps`
    steps, KV bytes of all devices). The first run compiles."""
    cfg = model.cfg
    capacity = context + decode_steps + 1
    batch *= sharding.size(mesh)
    specs = sharding.row_specs(lambda b: kv.make_cache(cfg, b, capacity, dtype, kernels, kv_dtype))
    prefill_fn, decode_fn = programs(cfg, dtype, GREEDY, decode_steps, mesh, specs)
    params = sharding.replicate(model.params, mesh)
    if not synthetic:
        rng = np.random.default_rng(context)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, context)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
        tokens, positions = sharding.place((tokens, positions), mesh, sharding.ROWS)

    def run():
        t_prefill = None
        if synthetic:
            cache = filled_cache(jax.random.PRNGKey(context), policy=kv, cfg=cfg, batch=batch, context=context,
                                 capacity=capacity, dtype=dtype, kernels=kernels, kv_dtype=kv_dtype)
            cache = sharding.place(cache, mesh, specs)
            logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
        else:
            cache = sharding.create(lambda: kv.make_cache(cfg, batch, capacity, dtype, kernels, kv_dtype), mesh, specs)
            t0 = time.perf_counter()
            logits, cache = prefill_fn(params, tokens, positions, cache)
            logits.block_until_ready()
            t_prefill = time.perf_counter() - t0
        # eos_id -1 never matches: every sequence decodes all steps.
        state = start_state(logits, cache, jax.random.PRNGKey(0), decode_steps + 1, GREEDY, -1)
        state = sharding.place(state, mesh, state_specs(specs))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = decode_fn(params, state, -1)
        state.step.block_until_ready()
        return t_prefill, time.perf_counter() - t0, state.cache.nbytes

    return run


@struct.dataclass
class NoAttention(KVCache):
    """A cache that stores nothing and attends to nothing (a layer's output is its q): a decode step
    through it costs the weights and everything else but attention (`--split`)."""

    lengths: jax.Array  # int32 [b]
    layers: int = struct.field(pytree_node=False)

    @property
    def segments(self):
        return ((0, self.layers),)

    def attend(self, layer, q, k, v, positions):
        return q, self


def no_attention_runner(model, context: int, decode_steps: int, batch: int, dtype):
    """-> run(): (None, seconds of `decode_steps` decode steps through NoAttention, 0)."""
    cfg = model.cfg

    def run():
        cache = NoAttention(jnp.full((batch,), context, jnp.int32), cfg.num_layers)
        state = start_state(jnp.zeros((batch, cfg.vocab_size), jnp.float32), cache, jax.random.PRNGKey(0),
                            decode_steps + 1, GREEDY, -1)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = decode_chunk(model.params, state, -1, cfg=cfg, dtype=dtype, sampling=GREEDY, chunk=decode_steps)
        state.step.block_until_ready()
        return None, time.perf_counter() - t0, 0

    return run


def overhead_model(cfg):
    """The model's program at tiny shapes (the same layers, heads and ops; dims of 16 to 64, 256 tokens):
    a decode step through it costs what does not grow with the weights, the per-op overhead."""
    small = cfg.replace(hidden_size=64, intermediate_size=64, vocab_size=256, head_dim=16,
                        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
    return LoadedModel(small, init_params(small, jax.random.PRNGKey(0)), None, "overhead")


def interleaved(runners, repeats: int) -> list[list[tuple]]:
    """Warms up (compiles) every runner, then runs each once per round for `repeats` rounds, so that
    a machine whose speed drifts (a shared VM) slows every policy alike. -> the runs of each runner."""
    for run in runners:
        run()
    runs = [[] for _ in runners]
    for _ in range(repeats):
        for out, run in zip(runs, runners):
            out.append(run())
    return runs


def summary(runs, batch: int, context: int, decode_steps: int):
    """-> (prefill tokens/s or None, decode ms/token, KV bytes): medians of the runs."""
    t_prefill = None if runs[0][0] is None else float(np.median([r[0] for r in runs]))
    t_decode = float(np.median([r[1] for r in runs]))
    return (None if t_prefill is None else batch * context / t_prefill), 1e3 * t_decode / decode_steps, runs[0][2]


def cpu_model() -> str:
    """The CPU's model name (pallas_kernels.cpu_bench) and how many there are."""
    return f"{cpu_bench.cpu_model()} x {os.cpu_count()}"


def largest_batch(policy, cfg, capacity: int, dtype, budget_bytes: int, kv_dtype=None) -> int:
    """The most sequences of `capacity` tokens whose cache fits `budget_bytes` (cache bytes are affine in batch)."""
    one, two = (cache_bytes(policy, cfg, n, capacity, dtype, kv_dtype) for n in (1, 2))
    per_sequence, fixed = two - one, 2 * one - two
    return max(0, (budget_bytes - fixed) // per_sequence)


def fitting_batches(args, policies, cfg, capacity: int, dtype) -> list[int]:
    """--batch for every policy, or with --kv-budget-gib each policy's largest batch that fits."""
    if args.kv_budget_gib is None:
        return [args.batch] * len(policies)
    budget = int(args.kv_budget_gib * 2**30)
    batches = [largest_batch(kv, cfg, capacity, dtype, budget, DTYPES.get(args.kv_dtype)) for kv in policies]
    if min(batches) < 1:
        raise KvjaxError(f"one sequence of {capacity} tokens does not fit {args.kv_budget_gib} GiB of KV cache "
                         f"under {policies[batches.index(min(batches))].name}")
    return batches


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m kvjax.bench", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="model to load (default: the embedded SmolLM2-135M)")
    source.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="random weights of this preset's shapes, the cache filled directly; decode only")
    p.add_argument("--contexts", type=cli.int_list(1), default=[128, 1024, 4096],
                   help="comma-separated context lengths (tokens already in the cache when decoding starts)")
    p.add_argument("--decode-steps", type=cli.at_least(1), default=32, help="decode steps timed per measurement")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=cli.at_least(1), default=1, help="sequences decoded together on each device")
    batch.add_argument("--kv-budget-gib", type=cli.above(0.0), default=None,
                       help="per policy, the largest batch whose KV cache at the largest context fits this many GiB "
                            "(on each device)")
    batch.add_argument("--memory-budget-gib", type=cli.above(0.0), default=None,
                       help="with --memory: per policy, the largest batch whose whole process (weights, cache, "
                            "working memory) is estimated to fit this many GiB at the largest context")
    p.add_argument("--memory", action="store_true",
                   help="each policy and context in a process of its own, prefilled for real: its peak memory")
    p.add_argument("--split", action="store_true",
                   help="also time a decode step without attention and the weights' products alone, and print "
                        "each policy's step split into weights, attention and the rest, each against this "
                        "machine's limits (CPU: copy bandwidth and multiply-add rate measured in the same run)")
    p.add_argument("--repeats", type=cli.at_least(1), default=3,
                   help="rounds of timed runs, every policy once a round (median)")
    add_policy_flags(p)
    add_kernels_flag(p)
    add_weights_flag(p)
    add_devices_flag(p)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="compute dtype (default: float32 on CPU)")
    p.add_argument("--kv-dtype", default=None, choices=sorted(DTYPES),
                   help="what 16-bit K/V (fp16's whole cache, every window and sink) are stored in (default: the "
                        "compute dtype if 16-bit, else float16; float32 measures a cache kept in the compute dtype)")
    p.add_argument("--json", type=cli.output_file, default=None,
                   help="append one JSON line per (policy, context) to this file")
    return p


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    contexts = args.contexts
    dtype_name = args.dtype or default_dtype()
    policies = policies_from_flags(args)
    names = [p.name for p in policies]
    last = max(contexts) + args.decode_steps + 1
    cfg = get_preset(args.preset) if args.preset else read_config(args.model)
    if args.preset:
        cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, last))
    if cfg is not None:
        if last > cfg.max_position_embeddings:
            raise KvjaxError(f"--contexts {max(contexts)} + --decode-steps {args.decode_steps} exceeds the model's "
                             f"{cfg.max_position_embeddings} tokens")
        for kv in policies:
            kv.check(cfg)
    if args.memory_budget_gib and not args.memory:
        raise KvjaxError("--memory-budget-gib measures whole processes: add --memory")
    if args.split and (args.kv_budget_gib or args.memory):
        raise KvjaxError("--split compares policies at one --batch: not with --kv-budget-gib or --memory")
    if args.memory and args.kv_budget_gib:
        raise KvjaxError("--memory sizes batches by the whole process: use --memory-budget-gib, not --kv-budget-gib")
    mesh = mesh_from_flags(args)
    if mesh.size > 1 and (args.split or args.memory):
        raise KvjaxError(f"--split and --memory measure one device: add --devices 1 (this machine has {mesh.size})")
    batches = fitting_batches(args, policies, cfg, last, DTYPES[dtype_name]) if cfg is not None else None
    kernels = kernels_from_flags(args)  # after the numbers: on a CPU, auto may build the C++ kernel
    held = weights_from_flags(args)  # how the matrices are held
    if args.memory:
        if cfg is None:
            raise KvjaxError("--memory needs a model whose config is known before it loads (a .gguf file, a folder "
                             "or --preset)")
        return memory_table(args, policies, cfg, dtype_name, argv, held)
    if args.preset:
        cli.say(f"[kvjax] random weights of {args.preset}")
        params = init_params(cfg, jax.random.PRNGKey(0), DTYPES[dtype_name])
        params = preset_weights(params, held)
        model = LoadedModel(cfg, params, None, f"random {args.preset}")
    else:
        cli.say(f"[kvjax] loading {resolve_model(args.model)}")
        model = load_model(args.model, DTYPES[dtype_name], held)
    batches = batches or fitting_batches(args, policies, model.cfg, last, DTYPES[dtype_name])
    device = jax.devices()[0]
    model_name = model.source if args.preset else model.cfg.name
    read = step_weight_bytes(model.params)
    common = {"model": model_name, "weights": held.value, "weight_bytes": read, "device": device.device_kind,
              "cpu": cpu_model(),
              "platform": device.platform, "jax": jax.__version__, "dtype": dtype_name,
              "devices": mesh.size, "kv_dtype": args.kv_dtype, "kv_budget_gib": args.kv_budget_gib, "decode_steps": args.decode_steps, "date": datetime.date.today().isoformat(),
              "command": "python -m kvjax.bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"model {model_name} | {sharding.describe(mesh)} ({device.device_kind}) | "
          f"{cpu_model()} | jax {jax.__version__} | dtype {dtype_name} | weights {held.value} "
          f"({read / 1e6:.0f} MB read a step) | "
          + (f"KV stored in {args.kv_dtype} | " if args.kv_dtype else "")
          + (f"KV budget {args.kv_budget_gib} GiB" if args.kv_budget_gib else f"batch {args.batch}")
          + (" per device" if mesh.size > 1 else ""))
    print(f"{'kv':<16} {'batch':>6} {'context':>8} {'prefill tok/s':>14} {'decode ms/tok':>14} {'decode tok/s':>13} "
          f"{'KV MiB':>8}")
    limits = machine_limits() if args.split else None
    for context in contexts:
        runners = [context_runner(model, context, args.decode_steps, batch, kv, DTYPES[dtype_name],
                                  synthetic=bool(args.preset), kernels=kernels, kv_dtype=DTYPES.get(args.kv_dtype),
                                  mesh=mesh)
                   for kv, batch in zip(policies, batches)]
        if args.split:
            runners += [no_attention_runner(m, context, args.decode_steps, args.batch, DTYPES[dtype_name])
                        for m in (model, overhead_model(model.cfg))]
        runs_all = interleaved(runners, args.repeats)
        if args.split:
            step_ms = lambda runs: 1e3 * float(np.median([r[1] for r in runs])) / args.decode_steps
            split = (step_ms(runs_all[-2]), step_ms(runs_all[-1]))
            runs_all = runs_all[:-2]
        rows = []
        for name, batch, runs in zip(names, batches, runs_all):
            tps, ms, kv_bytes = summary(runs, batch * mesh.size, context, args.decode_steps)
            rows.append((name, batch, ms, kv_bytes))
            prefill_col = "-" if tps is None else f"{tps:.1f}"
            print(f"{name:<16} {batch:>6} {context:>8} {prefill_col:>14} {ms:>14.2f} {batch * mesh.size * 1e3 / ms:>13.1f} "
                  f"{kv_bytes / 2**20:>8.1f}", flush=True)
            if args.json:
                row = {**common, "kv": name, "batch": batch, "context": context, "prefill_tokens_per_s": tps,
                       "decode_ms_per_token": ms, "decode_tokens_per_s": batch * mesh.size * 1e3 / ms, "kv_bytes": kv_bytes}
                with cli.open_for_append(args.json) as f:
                    f.write(json.dumps(row) + "\n")
        if args.split:
            print_split(model.cfg, policies, rows, context, split, limits, read)
    return 0


def machine_limits():
    """(read GB/s, copy GB/s, multiply-adds/s) of this CPU (pallas_kernels.cpu_bench), or None elsewhere."""
    if jax.default_backend() != "cpu":
        return None
    limits = cpu_bench.Limits(threads=os.cpu_count() or 1)  # builds the C++ loops on first use
    return limits.read_gbs(), limits.copy_gbs(), limits.fma_rate()


def print_split(cfg, policies, rows, context: int, split, limits, weights_read: int):
    """Each policy's decode step split into attention (the step less the same step without attention),
    the rest (the step without attention at tiny shapes: norms, rotations, sampling, per-op overhead)
    and the weights (what is left), against the machine's limits: a part's limit is the larger of its
    bytes over the read bandwidth and its multiply-adds over the FMA rate (weights: every matrix once a
    step, `weights_read` bytes; attention: the K/V held, 2 h multiply-adds per slot and query head)."""
    no_attention_ms, rest_ms = split
    weights_ms = no_attention_ms - rest_ms
    weight_params = memory.parameter_bytes(cfg, jnp.float32) // 4
    print(f"\nstep split at {context} tokens" + (" (limits: read %.1f GB/s, copy %.1f GB/s, %.1f G multiply-adds/s)"
                                                % (limits[0], limits[1], limits[2] / 1e9) if limits else ""))
    print(f"{'kv':<16} {'batch':>5} {'step ms':>8} {'weights':>8} {'limit':>6} {'':>4} {'attention':>9} {'limit':>6} "
          f"{'':>4} {'rest':>6}")
    for (name, batch, ms, kv_bytes), policy in zip(rows, policies):
        attention_ms = ms - no_attention_ms
        held = kv_bytes * context / (context + 1)  # the cache's bytes, as good as all of it read each step
        limit = lambda nbytes, macs: 1e3 * max(nbytes / (limits[0] * 1e9), macs / limits[2]) if limits else float("nan")
        w_limit = limit(weights_read, batch * weight_params)
        a_limit = limit(held, batch * context * cfg.num_heads * cfg.head_dim * 2 * cfg.num_layers)
        pct = lambda t, lim: f"{100 * lim / t:3.0f}%" if t > 0 else "   -"
        print(f"{name:<16} {batch:>5} {ms:>8.2f} {weights_ms:>8.2f} {w_limit:>6.2f} {pct(weights_ms, w_limit)} "
              f"{attention_ms:>9.2f} {a_limit:>6.2f} {pct(attention_ms, a_limit)} {rest_ms:>6.2f}",
              flush=True)


def preset_matrices(held: Weights) -> Kind | None:
    """How a preset's random layer matrices are held under `held`: native as the default model's GGUF
    holds them (Q4_1; its table Q8_0), q8_0 in Q8_0 (a float checkpoint's), float32 as they are (None)."""
    return None if held is Weights.FLOAT32 else Kind.Q8_0 if held is Weights.Q8_0 else Kind.Q4_1


def preset_weights(params, held: Weights):
    """A preset's random float params held as `held` says (`preset_matrices`)."""
    matrices = preset_matrices(held)
    return params if matrices is None else as_blocks(params, matrices)


def memory_table(args, policies, cfg, dtype: str, argv, held: Weights) -> int:
    """--memory: each (policy, context) measured in a fresh process (`measure_memory`)."""
    print(f"model {args.preset or cfg.name} | {cpu_model()} | jax {jax.__version__} | dtype {dtype} | "
          + (f"process budget {args.memory_budget_gib} GiB" if args.memory_budget_gib else f"batch {args.batch}"))
    print(f"{'kv':<20} {'batch':>5} {'context':>7} {'KV GiB':>7} {'before':>7} {'peak':>7} {'above':>7} "
          f"{'work':>7} {'estimate':>8} {'prefill tok/s':>13} {'decode tok/s':>12}")
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its peak is this run's alone
    jdtype, backend = DTYPES[dtype], kernels_from_flags(args)
    if args.preset:  # None (float): what estimate_memory assumes
        matrices = preset_matrices(held)
        held_bytes = None if matrices is None else as_blocks_bytes(cfg, matrices, dtype=jdtype)
    else:
        held_bytes = weight_bytes(args.model, held, jdtype)
    for context in args.contexts:
        for policy in policies:
            batch = args.batch
            need = lambda n: estimate_memory(cfg, policy, n, context, args.decode_steps + 1, dtype, held_bytes,
                                             backend)
            if args.memory_budget_gib:
                batch = 0
                while need(batch + 1).total <= args.memory_budget_gib * memory.GIB:
                    batch += 1
                if batch == 0:
                    print(f"{policy.name:<20} one sequence of {context} tokens is estimated to need "
                          f"{need(1).describe()}", flush=True)
                    continue
            with ctx.Pool(1) as pool:
                run = pool.apply(measure_memory, (args.model, args.preset, policy, batch, context, args.decode_steps,
                                                  dtype, args.kernels, held.value))
            gib = lambda x: x / memory.GIB
            above = run["peak"] - run["before"]
            print(f"{policy.name:<20} {batch:>5} {context:>7} {gib(run['kv_bytes']):>7.3f} {gib(run['before']):>7.2f} "
                  f"{gib(run['peak']):>7.2f} {gib(above):>7.2f} {gib(above - run['kv_bytes']):>7.2f} "
                  f"{gib(need(batch).total):>8.2f} {batch * context / run['prefill_s']:>13.1f} "
                  f"{batch * args.decode_steps / run['decode_s']:>12.1f}", flush=True)
            if args.json:
                row = {"model": args.preset or cfg.name, "cpu": cpu_model(), "jax": jax.__version__, "dtype": dtype,
                       "date": datetime.date.today().isoformat(), "kv": policy.name, "batch": batch,
                       "context": context, "decode_steps": args.decode_steps, "estimate": need(batch).total,
                       "memory_budget_gib": args.memory_budget_gib, **run,
                       "command": "python -m kvjax.bench " + " ".join(sys.argv[1:] if argv is None else argv)}
                with cli.open_for_append(args.json) as f:
                    f.write(json.dumps(row) + "\n")
    return 0


def measure_memory(model, preset, policy, batch: int, context: int, decode_steps: int, dtype: str, kernels,
                   weights: str = "float32") -> dict:
    """In the process it runs in: loads the model (or random weights of a preset), prefills `batch`
    random prompts of `context` tokens through `policy`, decodes `decode_steps` steps -> bytes held
    before (the loaded model and runtime) and at peak, the cache's bytes, and the seconds of each."""
    jdtype = DTYPES[dtype]
    if preset:
        cfg = get_preset(preset)
        cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings,
                                                                   context + decode_steps + 1))
        params = jax.block_until_ready(preset_weights(init_params(cfg, jax.random.PRNGKey(0), jdtype), Weights(weights)))
        jax.clear_caches()  # the initializers' compiled programs are not part of what is measured
    else:
        loaded = load_model(model, jdtype, weights)
        cfg, params = loaded.cfg, loaded.params
    memory.release_freed()
    before = memory.current()
    memory.reset_peak()
    tokens = jnp.asarray(np.random.default_rng(context).integers(0, cfg.vocab_size, (batch, context)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    capacity = context + decode_steps + 1
    run_prefill, run_decode = compile_programs(params, cfg, policy, tokens, positions, capacity, decode_steps + 1,
                                               jdtype, kernels, GREEDY, -1, decode_steps)  # as generate does
    cache = policy.make_cache(cfg, batch, capacity, jdtype, kernels)
    t0 = time.perf_counter()
    logits, cache = run_prefill(params, tokens, positions, cache)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    state = start_state(logits, cache, jax.random.PRNGKey(0), decode_steps + 1, GREEDY, -1)
    kv_bytes = state.cache.nbytes
    t0 = time.perf_counter()
    state = run_decode(params, state, -1)
    state.step.block_until_ready()
    decode_s = time.perf_counter() - t0
    return {"before": before, "peak": max(memory.peak(), before), "kv_bytes": kv_bytes,
            "weights": memory.parameter_bytes(cfg, jdtype), "prefill_s": prefill_s, "decode_s": decode_s}


if __name__ == "__main__":
    sys.exit(main())
