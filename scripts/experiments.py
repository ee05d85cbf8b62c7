"""Pieces the experiment scripts share: a segment's next-token NLL through a cache, and the
shipped controller's 4-bit minus 2-bit logit per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.controller import default_controller
from kvjax.features import token_features
from kvjax.model import forward, forward_with_stats

_forward = jax.jit(forward, static_argnums=1)
_forward_with_stats = jax.jit(forward_with_stats, static_argnums=1)


def nll_through(model, ids, cache) -> np.ndarray:
    """ids int [T] scored at positions 0..T-1 through `cache` (batch 1) -> next-token NLL [T-1]."""
    T = len(ids)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    logits, _ = _forward(model.params, model.cfg, tokens, positions, cache)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0])


def controller_margin(model, ids, budget: float) -> np.ndarray:
    """float [T]: the shipped controller for `budget`'s 4-bit minus 2-bit logit of each token,
    from FP16 features of the segment (positions 0..T-1)."""
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    logits, _, stats = _forward_with_stats(model.params, model.cfg, tokens, positions)
    out = np.asarray(default_controller(budget).logits(token_features(logits, tokens, positions, stats)))[0]
    return out[:, 1] - out[:, 0]  # columns follow WIDTHS (2, 4, 8, 16)
