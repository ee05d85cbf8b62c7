"""KV-cache policies by name: what `--kv` selects and `make_cache` builds."""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.cache import DenseCache
from kvjax.config import ModelConfig
from kvjax.errors import KvjaxError

POLICY_NAMES = ("fp16",)


def make_cache(policy: str, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32):
    """An empty cache of `policy` for `batch` sequences of up to `capacity` tokens each."""
    if policy == "fp16":
        return DenseCache.init(cfg, batch, capacity, dtype)
    raise KvjaxError(f"unknown KV-cache policy {policy!r}; known: {', '.join(POLICY_NAMES)}")
