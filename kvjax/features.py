"""Cheap per-token features for precision policies, computed from a step's own outputs.

A token's features come from the forward step that processed it (its logits predict the
next token), so the step-by-step decode and the teacher-forced path see the same values.

  entropy     entropy of the next-token distribution, in nats
  confidence  its maximum probability
  rarity      log(1 + token id) / log(vocab): byte-level BPE ids grow with merge order,
              so later (longer, rarer) merges get larger values; a corpus frequency table
              replaces this proxy in the learned controller
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FEATURE_NAMES = ("entropy", "confidence", "rarity")
NUM_FEATURES = len(FEATURE_NAMES)


def token_features(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits float32 [b, t, v], tokens int32 [b, t] -> features float32 [b, t, F]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(logp)
    entropy = -jnp.sum(probs * logp, axis=-1)
    confidence = jnp.max(probs, axis=-1)
    rarity = jnp.log1p(tokens.astype(jnp.float32)) / jnp.log(float(logits.shape[-1]))
    return jnp.stack([entropy, confidence, rarity], axis=-1)
