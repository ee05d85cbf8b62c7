"""Cheap per-token features for precision policies, computed from a step's own outputs.

A token's features come from the forward step that processed it (its logits predict the
next token; its own query, key and value), so step-by-step decoding and the teacher-forced
path see the same values. Nothing here depends on later steps.

  entropy     entropy of the next-token distribution, in nats
  confidence  its maximum probability
  rarity      log(1 + token id) / log(vocab): byte-level BPE ids grow with merge order,
              so later (longer, rarer) merges get larger values (the rule policy's proxy)
  token       the token id itself (exact in float32); the learned controller turns it into
              corpus rarity -log((c + 1) / (N + |V| + 1)) with its own frequency table
  position    log(1 + position)
  key_norm    mean over layers and kv heads of the token's key norm (after RoPE)
  value_norm  the same for its value
  head_var    last layer: variance across query heads of the token's attention score on its
              own key. A proxy for the paper's "variance of last-layer attention across heads"
              that needs no attention probabilities from the caches' `attend`.

Cost: one softmax over the vocabulary (already needed to sample) and O(l * n * h) per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.model import forward, forward_with_stats

FEATURE_NAMES = ("entropy", "confidence", "rarity", "token", "position", "key_norm", "value_norm", "head_var")
NUM_FEATURES = len(FEATURE_NAMES)


def token_features(logits: jax.Array, tokens: jax.Array, positions: jax.Array, stats: jax.Array) -> jax.Array:
    """logits float32 [b, t, v], tokens, positions int32 [b, t], stats [l, b, t, 3]
    (kvjax.model.forward_with_stats) -> features float32 [b, t, F]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(logp)
    entropy = -jnp.sum(probs * logp, axis=-1)
    confidence = jnp.max(probs, axis=-1)
    token = tokens.astype(jnp.float32)
    rarity = jnp.log1p(token) / jnp.log(float(logits.shape[-1]))
    position = jnp.log1p(jnp.maximum(positions, 0).astype(jnp.float32))
    key_norm, value_norm = stats[..., 0].mean(0), stats[..., 1].mean(0)
    head_var = stats[-1, ..., 2]
    return jnp.stack([entropy, confidence, rarity, token, position, key_norm, value_norm, head_var], axis=-1)


def forward_recording_features(params, cfg, tokens, positions, cache, dtype=jnp.float32):
    """One decode step: `forward`, and if the cache's policy reads features, records them."""
    if not cache.uses_features:
        return forward(params, cfg, tokens, positions, cache, dtype)
    logits, cache, stats = forward_with_stats(params, cfg, tokens, positions, cache, dtype)
    return logits, cache.record_features(positions, token_features(logits, tokens, positions, stats))
