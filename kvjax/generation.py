"""Text generation: a jitted prefill, then a jitted decode loop (`lax.while_loop`).

    model = kvjax.load_model()                       # the embedded SmolLM2-135M-Instruct
    result = kvjax.generate(model, ["The capital of France is"], max_new_tokens=20)
    print(result.texts[0], result.stats_line())

The command line is kvjax/generate.py (`python -m kvjax.generate`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import memory, sharding
from kvjax.chunk import max_tokens
from kvjax.errors import KvjaxError
from kvjax.features import forward_recording_features, token_features
from kvjax.kernels import Backend, Kernels, Native
from kvjax.loading import LoadedModel
from kvjax.model import DTYPES, head, hidden_states
from kvjax.policies import Policy, cache_bytes, get_policy
from kvjax.sampling import SamplingConfig, sample


@struct.dataclass
class DecodeState:
    last: jax.Array  # int32 [b]: the newest token of each sequence
    cache: object
    key: jax.Array
    done: jax.Array  # bool [b]
    tokens: jax.Array  # int32 [b, max_new]: generated tokens (eos_id after the end)
    step: jax.Array  # int32 []: tokens generated so far (per sequence, the same for all)
    rows: jax.Array  # int32 [b]: each sequence's row in the whole batch (its sampling key: kvjax.sampling)


def state_specs(cache_specs) -> DecodeState:
    """How a DecodeState is split over a mesh (kvjax.sharding), given its cache's specs."""
    rows, same = sharding.ROWS, sharding.REPLICATED
    return DecodeState(last=rows, cache=cache_specs, key=same, done=rows, tokens=rows, step=same, rows=rows)


PREFILL_ROWS = 1024  # prompt tokens per prefill step over the batch: what the weights' products need to run at speed
PREFILL_CHUNK = 256  # and at least this many per sequence (a chunk's attention reads what the cache holds once)


def chunk_size(batch: int, length: int, limit: int | None = None, chunk: int | None = None) -> int:
    """Prompt tokens per sequence a prefill step takes, for `batch` prompts of up to `length` tokens:
    `chunk`, by default PREFILL_ROWS over the batch but at least PREFILL_CHUNK; at most `limit` (a
    cache's `max_chunk`) and the prompt. Measured (BENCHMARKS.md, "a prompt chunk attended at once"):
    batch 1 prefills 1.2x faster in chunks of 1024 than of 256; at batch 8, chunks of 128-512 differ by
    at most 8%."""
    return max(1, min(chunk or max(PREFILL_CHUNK, PREFILL_ROWS // batch), limit or length, length))


# What a generate request holds at its peak besides its weights and cache (kvjax.memory.Estimate),
# from the compiled prefill's own memory analysis and measured peaks (BENCHMARKS.md, "peak memory"):
RUNTIME_BYTES = int(0.45 * memory.GIB)  # Python, jax, XLA's client and compiled programs, the tokenizer
# A decode step scans each run of layers of equal widths (`Layout.segments`: learned-alloc@B has 20-26;
# a prefill chunk scans every layer at once): each scan past the first added ~16 MiB to the peak of
# compiling and running (one run, learned-alloc@2.5 against kivi2 at 8 x 7900 tokens: BENCHMARKS.md,
# "One prefill scan for widths that differ by layer").
COMPILE_BYTES_PER_SEGMENT = 16 * 2**20


def estimate_memory(cfg, policy: Policy, batch: int, prompt_length: int, max_new_tokens: int,
                    dtype="float32", weight_bytes: int | None = None, kernels: Backend | None = None) -> memory.Estimate:
    """What generating `max_new_tokens` after `batch` prompts of up to `prompt_length` tokens needs at
    its peak, from shapes alone (nothing is loaded or compiled): the weights (`weight_bytes`, as
    kvjax.loading.weight_bytes says they will be held; None: every matrix in `dtype`), the cache, and the
    working memory of one prefill chunk (its attention as the `kernels` backend runs it, activations,
    logits where a policy reads features) beside the runtime's own and the compiler's. `kernels`
    None: the least any backend holds (a check before the choice is resolved, kvjax.kernels.resolve)."""
    jdtype = DTYPES[dtype]
    capacity = prompt_length + max_new_tokens
    layout = policy.layout(cfg, capacity)
    limit = max_tokens(layout, policy.uses_features) if layout else None  # TieredCache.max_chunk
    chunk = chunk_size(batch, prompt_length, limit)
    item = jnp.dtype(jdtype).itemsize
    shape = (batch, chunk, cfg.num_heads, capacity, cfg.head_dim)
    backends = (Backend(), Native()) if kernels is None else (kernels,)
    attention = min(b.chunk_bytes(*shape) for b in backends)
    activations = batch * chunk * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * max(item, 4)
    logits = batch * (chunk if policy.uses_features else 1) * cfg.vocab_size * 4 * 3
    compiling = COMPILE_BYTES_PER_SEGMENT * (len(layout.segments) - 1 if layout else 0)
    weights = memory.parameter_bytes(cfg, jdtype) if weight_bytes is None else weight_bytes
    return memory.Estimate(weights=weights,
                           cache=cache_bytes(policy, cfg, batch, capacity, jdtype),
                           transient=RUNTIME_BYTES + attention + activations + logits + compiling)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk"), donate_argnames=("cache",))
def prefill(params, tokens, positions, cache, *, cfg, dtype, chunk: int | None = None):
    """Runs right-padded prompts tokens/positions [b, T] (-1 on padding) into the cache, `chunk`
    tokens at a time (`chunk_size`) -> (logits [b, v] of each prompt's last token, cache).

    Each chunk goes through the model and the cache as decoding's steps do (kvjax.chunk): the
    cache ends in the state step-by-step decoding of the prompt would have left, while only one
    chunk's activations, scores and full-precision K/V exist at a time, and the output head runs
    on the last token only (on every token of a chunk for a policy that reads token features).
    """
    b, T = tokens.shape
    C = chunk_size(b, T, cache.max_chunk, chunk)
    steps = -(-T // C)
    tokens = jnp.pad(tokens, ((0, 0), (0, steps * C - T)))
    positions = jnp.pad(positions, ((0, 0), (0, steps * C - T)), constant_values=-1)
    last = jnp.max(positions, axis=1)  # each row's last position

    def step(carry, m):
        cache, x_last = carry
        tok, pos = (jax.lax.dynamic_slice_in_dim(a, m * C, C, axis=1) for a in (tokens, positions))
        x, cache, stats = hidden_states(params, cfg, tok, pos, cache, dtype, token_stats=cache.uses_features)
        if cache.uses_features:
            logits = head(params, cfg, x, dtype)
            cache = cache.record_features(pos, token_features(logits, tok, pos, stats))
        here = (pos == last[:, None]) & (pos >= 0)  # [b, C]: the row's last token, if in this chunk
        x_here = jnp.take_along_axis(x, jnp.argmax(here, axis=1)[:, None, None], axis=1)[:, 0]  # [b, d]
        return (cache, jnp.where(jnp.any(here, axis=1)[:, None], x_here, x_last)), None

    x_last = jnp.zeros((b, cfg.hidden_size), dtype)
    (cache, x_last), _ = jax.lax.scan(step, (cache, x_last), jnp.arange(steps))
    return head(params, cfg, x_last, dtype), cache


def start_state(last_logits, cache, key, max_new: int, sampling: SamplingConfig, eos_id: int):
    """Samples the first new token from the prefill logits."""
    key, sub = jax.random.split(key)
    rows = jnp.arange(last_logits.shape[0], dtype=jnp.int32)
    first = sample(last_logits, sub, sampling, rows)
    tokens = jnp.full((first.shape[0], max_new), eos_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(last=first, cache=cache, key=key, done=first == eos_id, tokens=tokens,
                       step=jnp.int32(1), rows=rows)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "sampling", "chunk", "mesh"),
                   donate_argnames=("state",))
def decode_chunk(params, state: DecodeState, eos_id, *, cfg, dtype, sampling: SamplingConfig, chunk: int,
                 mesh=None):
    """Up to `chunk` decode steps in one dispatch; stops early when every sequence is done (on every
    device of `mesh`, when each runs its rows: kvjax.sharding)."""
    max_new = state.tokens.shape[1]

    def cond(carry):
        i, s = carry
        return (i < chunk) & (s.step < max_new) & ~sharding.every(jnp.all(s.done), mesh)

    def body(carry):
        i, s = carry
        positions = jnp.where(s.done, -1, s.cache.lengths)[:, None]
        logits, cache = forward_recording_features(params, cfg, s.last[:, None], positions, s.cache, dtype)
        key, sub = jax.random.split(s.key)
        nxt = jnp.where(s.done, eos_id, sample(logits[:, 0], sub, sampling, s.rows))
        s = DecodeState(last=nxt, cache=cache, key=key, done=s.done | (nxt == eos_id),
                        tokens=s.tokens.at[:, s.step].set(nxt), step=s.step + 1, rows=s.rows)
        return i + 1, s

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


KEPT_PROGRAMS = 4  # compiled (prefill, decode) pairs kept for requests of the same shapes (an evaluation's batches)
_kept: dict[tuple, tuple] = {}


def compile_programs(params, cfg, policy: Policy, tokens, positions, capacity: int, max_new: int, dtype, kernels,
                     sampling: SamplingConfig, eos_id: int, chunk: int, mesh=None):
    """The compiled prefill and decode_chunk of a request, from shapes alone: compiled before the cache
    exists, the compiler's working memory (0.4 GiB more for a policy of many layer segments) and the
    cache are never held at once. -> (prefill_fn, decode_fn), each run by every device of `mesh` on its
    rows (kvjax.sharding; params replicated, the rest split by rows: `cache_specs`, `state_specs`). The
    last KEPT_PROGRAMS pairs are kept by everything they depend on (the shapes and types of params,
    tokens and positions, the settings and the mesh), so a request shaped like a recent one compiles
    nothing."""
    shapes = lambda tree: (jax.tree.structure(tree), tuple((x.shape, x.dtype) for x in jax.tree.leaves(tree)))
    key = (shapes((params, tokens, positions)), cfg, policy, capacity, max_new, dtype, kernels, sampling, eos_id, chunk,
           mesh)
    if key in _kept:
        _kept[key] = _kept.pop(key)  # the most recent last
        return _kept[key]
    while len(_kept) >= KEPT_PROGRAMS:
        _kept.pop(next(iter(_kept)))
    _kept[key] = _compile(params, cfg, policy, tokens, positions, capacity, max_new, dtype, kernels, sampling, eos_id,
                          chunk, mesh)
    return _kept[key]


def programs_kept() -> int:
    """How many compiled (prefill, decode) pairs `compile_programs` holds for reuse."""
    return len(_kept)


def forget_programs():
    """Drops the compiled pairs kept for reuse (their memory goes with the last reference)."""
    _kept.clear()


def cache_specs(policy: Policy, cfg, capacity: int, dtype, kernels):
    """How a request's cache is split over a mesh: each leaf by its row axis (kvjax.sharding.row_specs)."""
    return sharding.row_specs(lambda b: policy.make_cache(cfg, b, capacity, dtype, kernels))


def programs(cfg, dtype, sampling: SamplingConfig, chunk: int, mesh, specs):
    """`prefill` and `decode_chunk`, jitted, each run by every device of `mesh` on its rows (the cache
    split as `specs` say: `cache_specs`; one device: the functions themselves, their settings bound)
    -> (prefill_fn(params, tokens, positions, cache), decode_fn(params, state, eos_id))."""
    rows, same = sharding.ROWS, sharding.REPLICATED
    on_mesh = lambda fn, ins, outs, donate: jax.jit(sharding.per_device(fn, mesh, ins, outs), donate_argnums=donate)
    prefill_fn = on_mesh(functools.partial(prefill, cfg=cfg, dtype=dtype), (same, rows, rows, specs), (rows, specs), 3)
    decode_fn = on_mesh(functools.partial(decode_chunk, cfg=cfg, dtype=dtype, sampling=sampling, chunk=chunk,
                                          mesh=mesh), (same, state_specs(specs), same), state_specs(specs), 1)
    return prefill_fn, decode_fn


def _compile(params, cfg, policy, tokens, positions, capacity, max_new, dtype, kernels, sampling, eos_id, chunk, mesh):
    rows, same = sharding.ROWS, sharding.REPLICATED
    specs = cache_specs(policy, cfg, capacity, dtype, kernels)
    prefill_mesh, decode_mesh = programs(cfg, dtype, sampling, chunk, mesh, specs)
    cache = jax.eval_shape(lambda: policy.make_cache(cfg, tokens.shape[0], capacity, dtype, kernels))
    laid_out = lambda tree, specs: sharding.shapes_on(tree, mesh, specs)
    prefill_fn = prefill_mesh.lower(laid_out(params, same), laid_out(tokens, rows), laid_out(positions, rows),
                                    laid_out(cache, specs)).compile()
    logits, cache = jax.eval_shape(lambda *a: prefill(*a, cfg=cfg, dtype=dtype), params, tokens, positions, cache)
    state = jax.eval_shape(lambda l, c: start_state(l, c, jax.random.PRNGKey(0), max_new, sampling, eos_id),
                           logits, cache)
    decode_fn = decode_mesh.lower(laid_out(params, same), laid_out(state, state_specs(specs)), eos_id).compile()
    memory.release_freed()  # the compiler's freed memory back to the system before the cache is made
    return prefill_fn, decode_fn


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, without the final EOS
    texts: list[str]
    prompt_lengths: list[int]
    prefill_s: float
    decode_s: float
    decode_steps: int
    compile_s: float
    kv_bytes: int
    kv_policy: str
    kv_tiers: dict[str, int]  # tokens per tier of the first sequence at the end
    kv_capacity: int = 0  # tokens per sequence the cache was sized for
    kv_bits: float = float("nan")  # average bits of the first sequence's left tokens (nan: none left)
    memory_before: int = 0  # bytes held when the call began (the loaded model; kvjax.memory.current)
    memory_peak: int = 0  # the most bytes held during the call (kvjax.memory.peak)
    devices: str = ""  # what ran it (kvjax.sharding.describe), where more than one device did
    rows: int = 0  # sequences the cache holds: the prompts, and copies added so that they split evenly over the devices

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    def stats_line(self) -> str:
        batch = len(self.tokens)
        tok_s = batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")
        tiers = ", ".join(f"{name} {n}" for name, n in self.kv_tiers.items())
        per_token = self.kv_bytes / max(max(self.rows, batch) * self.kv_capacity, 1)
        bits = "" if self.kv_bits != self.kv_bits else f", left tokens at {self.kv_bits:.2f} bits"  # nan: none left
        rows = f"{batch}" if self.rows <= batch else f"{self.rows} ({batch} + {self.rows - batch} copies)"
        return (f"[kvjax] prefill {1e3 * self.prefill_s:.1f} ms ({sum(self.prompt_lengths)} tokens) | "
                f"decode {self.decode_ms_per_token:.2f} ms/token | {tok_s:.1f} tokens/s | "
                f"KV cache {self.kv_policy}: {self.kv_bytes / 2**20:.2f} MiB for {rows} x {self.kv_capacity} tokens "
                f"({per_token:,.0f} B/token{bits}; {tiers}) | memory {self.memory_peak / 2**30:.2f} GiB at peak, "
                f"{self.memory_before / 2**30:.2f} before | compile {self.compile_s:.1f} s"
                + (f" | {self.devices}" if self.devices else ""))


def pad_prompts(prompts: list[list[int]]):
    """Right-pads token lists -> tokens [b, t], positions [b, t] (-1 on padding): a batch of prompts as
    the model and every cache take it."""
    longest = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), longest), np.int32)
    positions = np.full((len(prompts), longest), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        positions[i, :len(p)] = np.arange(len(p))
    return jnp.asarray(tokens), jnp.asarray(positions)


def _visible_text(text: str) -> str:
    """Holds back a trailing partial UTF-8 character (decoded as U+FFFD) while streaming."""
    return text[:-1] if text.endswith("\ufffd") else text


def generate(model: LoadedModel, prompts: list[str] | list[list[int]], max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, kv: str | Policy = "fp16",
             dtype: str = "float32", chunk: int | None = None,
             on_text: Callable[[str], None] | None = None, kernels: Kernels | str = Kernels.AUTO,
             log: Callable[[str], None] | None = None, mesh=None) -> GenerationResult:
    """Generates up to `max_new_tokens` per prompt (strings or token-id lists).

    `chunk` decode steps run per device dispatch (default: all of them); `on_text`
    receives the new text of the first prompt after every chunk (streaming); `log` what is
    happening before the first token (compiling, prefill). On a `mesh` (kvjax.sharding.make_mesh)
    the prompts are split over its devices, with copies of the last prompt added until they divide
    evenly (their answers are dropped); a sequence's tokens are those one device would give it.
    """
    log = log or (lambda message: None)
    cfg, tok = model.cfg, model.tokenizer
    if max_new_tokens < 1:
        raise KvjaxError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    policy = get_policy(kv) if isinstance(kv, str) else kv
    if dtype not in DTYPES:
        raise KvjaxError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if not ids or any(len(p) == 0 for p in ids):
        raise KvjaxError("empty prompt")
    asked = len(ids)
    ids += [ids[-1]] * (sharding.padded(asked, mesh) - asked)  # each device takes as many rows
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise KvjaxError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {cfg.max_position_embeddings} tokens")
    jdtype = DTYPES[dtype]
    eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else -1
    chunk = chunk or max_new_tokens
    tokens, positions = sharding.place(pad_prompts(ids), mesh, sharding.ROWS)
    params = sharding.replicate(model.params, mesh)
    policy.check(cfg)
    capacity = longest + max_new_tokens
    memory.release_freed()
    memory_before = memory.current()
    memory.reset_peak()

    log(f"[kvjax] compiling prefill and decode for {len(ids)} x {capacity} tokens ({policy.name}, {dtype}"
        f"{', ' + sharding.describe(mesh) if sharding.size(mesh) > 1 else ''})")
    t0 = time.perf_counter()
    prefill_fn, decode_fn = compile_programs(params, cfg, policy, tokens, positions, capacity, max_new_tokens,
                                             jdtype, kernels, sampling, eos_id, chunk, mesh)
    compile_s = time.perf_counter() - t0
    specs = cache_specs(policy, cfg, capacity, jdtype, kernels)
    cache = sharding.create(lambda: policy.make_cache(cfg, len(ids), capacity, jdtype, kernels), mesh, specs)
    t0 = time.perf_counter()
    last_logits, cache = prefill_fn(params, tokens, positions, cache)
    last_logits.block_until_ready()
    prefill_s = time.perf_counter() - t0

    state = start_state(last_logits, cache, jax.random.PRNGKey(seed), max_new_tokens, sampling, eos_id)
    state = sharding.place(state, mesh, state_specs(specs))
    kv_bytes = state.cache.nbytes

    shown = ""
    decode_s = 0.0
    while True:
        if on_text is not None:
            text = _visible_text(tok.decode(_until_eos(sharding.gather(state.tokens)[0, :int(state.step)], eos_id)))
            on_text(text[len(shown):])
            shown = text
        if int(state.step) >= max_new_tokens or bool(jnp.all(state.done)):
            break
        t0 = time.perf_counter()
        state = decode_fn(params, state, eos_id)
        state.step.block_until_ready()
        decode_s += time.perf_counter() - t0
    if on_text is not None:
        final = tok.decode(_until_eos(sharding.gather(state.tokens)[0], eos_id))
        on_text(final[len(shown):])

    out = [_until_eos(row, eos_id) for row in sharding.gather(state.tokens)[:asked]]
    return GenerationResult(tokens=out, texts=[tok.decode(t) for t in out],
                            prompt_lengths=[len(p) for p in ids[:asked]], prefill_s=prefill_s,
                            decode_s=decode_s, decode_steps=int(state.step) - 1, compile_s=compile_s,
                            kv_bytes=kv_bytes, kv_policy=policy.name,
                            kv_tiers={k: int(sharding.gather(v)[0]) for k, v in state.cache.tokens_per_tier().items()},
                            kv_capacity=capacity, kv_bits=float(sharding.gather(state.cache.stored_bits())[0]),
                            memory_before=memory_before, memory_peak=max(memory.peak(), memory_before),
                            devices=sharding.describe(mesh) if sharding.size(mesh) > 1 else "", rows=len(ids))


def _until_eos(row: np.ndarray, eos_id: int) -> list[int]:
    row = [int(x) for x in row]
    return row[:row.index(eos_id)] if eos_id in row else row


def default_dtype() -> str:
    """float32 on CPU (XLA's CPU bf16 matmuls are slower), bfloat16 on GPU/TPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
