"""Next-token sampling: greedy, temperature, top-k and top-p, with explicit PRNG keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.errors import KvjaxError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise KvjaxError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise KvjaxError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise KvjaxError(f"top-p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig, rows: jax.Array | None = None) -> jax.Array:
    """logits float32 [b, v] -> token ids int32 [b]. Row i draws with fold_in(key, rows[i]) (rows:
    int32 [b], default 0..b-1), so what a sequence draws does not depend on the rows beside it or
    on the device it runs on (kvjax.sharding)."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        # the smallest logit still inside the nucleus (the top token is always kept)
        cutoff = jnp.min(jnp.where(mass_before < cfg.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    rows = jnp.arange(logits.shape[0]) if rows is None else rows
    keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(rows)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
