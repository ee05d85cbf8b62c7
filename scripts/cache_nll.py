"""The shared last step of the experiment scripts: a segment's next-token NLL through a cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.model import forward

_forward = jax.jit(forward, static_argnums=1)


def nll_through(model, ids, cache) -> np.ndarray:
    """ids int [T] scored at positions 0..T-1 through `cache` (batch 1) -> next-token NLL [T-1]."""
    T = len(ids)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    logits, _ = _forward(model.params, model.cfg, tokens, positions, cache)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0])
