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

from kvjax.errors import KvjaxError
from kvjax.features import forward_recording_features
from kvjax.kernels import Kernels
from kvjax.loading import LoadedModel
from kvjax.model import DTYPES
from kvjax.policies import Policy, get_policy
from kvjax.sampling import SamplingConfig, sample


@struct.dataclass
class DecodeState:
    last: jax.Array  # int32 [b]: the newest token of each sequence
    cache: object
    key: jax.Array
    done: jax.Array  # bool [b]
    tokens: jax.Array  # int32 [b, max_new]: generated tokens (eos_id after the end)
    step: jax.Array  # int32 []: tokens generated so far (per sequence, the same for all)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("cache",))
def prefill(params, tokens, positions, cache, *, cfg, dtype):
    """Runs the prompts (right-padded, positions -1 on padding) -> (last logits [b, v], cache).

    A quantized cache is filled through the exact teacher-forced path, so it ends in the
    state that step-by-step decoding of the prompt would have left.
    """
    logits, cache = cache.prefill(params, cfg, tokens, positions, dtype)
    last = jnp.argmax(positions, axis=1)  # index of each row's last real token
    return logits[jnp.arange(tokens.shape[0]), last], cache


def start_state(last_logits, cache, key, max_new: int, sampling: SamplingConfig, eos_id: int):
    """Samples the first new token from the prefill logits."""
    key, sub = jax.random.split(key)
    first = sample(last_logits, sub, sampling)
    tokens = jnp.full((first.shape[0], max_new), eos_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(last=first, cache=cache, key=key, done=first == eos_id, tokens=tokens,
                       step=jnp.int32(1))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "sampling", "chunk"),
                   donate_argnames=("state",))
def decode_chunk(params, state: DecodeState, eos_id, *, cfg, dtype, sampling: SamplingConfig, chunk: int):
    """Up to `chunk` decode steps in one dispatch; stops early when every sequence is done."""
    max_new = state.tokens.shape[1]

    def cond(carry):
        i, s = carry
        return (i < chunk) & (s.step < max_new) & ~jnp.all(s.done)

    def body(carry):
        i, s = carry
        positions = jnp.where(s.done, -1, s.cache.lengths)[:, None]
        logits, cache = forward_recording_features(params, cfg, s.last[:, None], positions, s.cache, dtype)
        key, sub = jax.random.split(s.key)
        nxt = jnp.where(s.done, eos_id, sample(logits[:, 0], sub, sampling))
        s = DecodeState(last=nxt, cache=cache, key=key, done=s.done | (nxt == eos_id),
                        tokens=s.tokens.at[:, s.step].set(nxt), step=s.step + 1)
        return i + 1, s

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


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

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    def stats_line(self) -> str:
        batch = len(self.tokens)
        tok_s = batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")
        tiers = ", ".join(f"{name} {n}" for name, n in self.kv_tiers.items())
        per_token = self.kv_bytes / max(batch * self.kv_capacity, 1)
        bits = "" if self.kv_bits != self.kv_bits else f", left tokens at {self.kv_bits:.2f} bits"  # nan: none left
        return (f"[kvjax] prefill {1e3 * self.prefill_s:.1f} ms ({sum(self.prompt_lengths)} tokens) | "
                f"decode {self.decode_ms_per_token:.2f} ms/token | {tok_s:.1f} tokens/s | "
                f"KV cache {self.kv_policy}: {self.kv_bytes / 2**20:.2f} MiB for {batch} x {self.kv_capacity} tokens "
                f"({per_token:,.0f} B/token{bits}; {tiers}) | compile {self.compile_s:.1f} s")


def _pad_prompts(prompts: list[list[int]]):
    """Right-pads token lists -> tokens [b, t], positions [b, t] (-1 on padding)."""
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
             log: Callable[[str], None] | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` per prompt (strings or token-id lists).

    `chunk` decode steps run per device dispatch (default: all of them); `on_text`
    receives the new text of the first prompt after every chunk (streaming); `log` what is
    happening before the first token (compiling, prefill).
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
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise KvjaxError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {cfg.max_position_embeddings} tokens")
    jdtype = DTYPES[dtype]
    eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else -1
    chunk = chunk or max_new_tokens
    tokens, positions = _pad_prompts(ids)
    policy.check(cfg)
    capacity = longest + max_new_tokens
    cache = policy.make_cache(cfg, len(ids), capacity, jdtype, kernels)

    log(f"[kvjax] compiling prefill and decode for {len(ids)} x {capacity} tokens ({policy.name}, {dtype})")
    t0 = time.perf_counter()
    prefill_fn = prefill.lower(model.params, tokens, positions, cache, cfg=cfg, dtype=jdtype).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    last_logits, cache = prefill_fn(model.params, tokens, positions, cache)
    last_logits.block_until_ready()
    prefill_s = time.perf_counter() - t0

    state = start_state(last_logits, cache, jax.random.PRNGKey(seed), max_new_tokens, sampling, eos_id)
    kv_bytes = state.cache.nbytes
    t0 = time.perf_counter()
    decode_fn = decode_chunk.lower(model.params, state, eos_id, cfg=cfg, dtype=jdtype,
                                   sampling=sampling, chunk=chunk).compile()
    compile_s += time.perf_counter() - t0

    shown = ""
    decode_s = 0.0
    while True:
        if on_text is not None:
            text = _visible_text(tok.decode(_until_eos(np.asarray(state.tokens[0, :int(state.step)]), eos_id)))
            on_text(text[len(shown):])
            shown = text
        if int(state.step) >= max_new_tokens or bool(jnp.all(state.done)):
            break
        t0 = time.perf_counter()
        state = decode_fn(model.params, state, eos_id)
        state.step.block_until_ready()
        decode_s += time.perf_counter() - t0
    if on_text is not None:
        final = tok.decode(_until_eos(np.asarray(state.tokens[0]), eos_id))
        on_text(final[len(shown):])

    out = [_until_eos(row, eos_id) for row in np.asarray(state.tokens)]
    return GenerationResult(tokens=out, texts=[tok.decode(t) for t in out],
                            prompt_lengths=[len(p) for p in ids], prefill_s=prefill_s,
                            decode_s=decode_s, decode_steps=int(state.step) - 1, compile_s=compile_s,
                            kv_bytes=kv_bytes, kv_policy=policy.name,
                            kv_tiers={k: int(v[0]) for k, v in state.cache.tokens_per_tier().items()},
                            kv_capacity=capacity, kv_bits=float(state.cache.stored_bits()[0]))


def _until_eos(row: np.ndarray, eos_id: int) -> list[int]:
    row = [int(x) for x in row]
    return row[:row.index(eos_id)] if eos_id in row else row


def default_dtype() -> str:
    """float32 on CPU (XLA's CPU bf16 matmuls are slower), bfloat16 on GPU/TPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
