"""Reference attention math shared by the model and the caches (pure jnp).

Shapes: q [b, t, n, h]; keys/values [b, k, s, h]; mask [b, t, s] (True = may attend).
Scores and softmax are computed in float32; the output has q's dtype.
"""

import jax
import jax.numpy as jnp

# A finite "minus infinity": a fully masked row (a padding query) gives a uniform
# softmax instead of NaN.
MASK_VALUE = -1e30


def grouped_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    """GQA scores: q [b, t, n, h] x keys [b, k, s, h] -> float32 [b, k, g, t, s], scaled by 1/sqrt(h).

    The query heads of one kv head and the t queries are folded into one matrix dimension
    ([b, k, g*t, h]): one batched matmul per kv head, which XLA runs far faster than a
    five-index einsum.
    """
    b, t, n, h = q.shape
    kv_heads = keys.shape[1]
    g = n // kv_heads
    qf = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)
    scores = jnp.einsum("bkqh,bksh->bkqs", qf, keys, preferred_element_type=jnp.float32)
    return scores.reshape(b, kv_heads, g, t, -1) * (h ** -0.5)


def grouped_output(probs: jax.Array, values: jax.Array, dtype) -> jax.Array:
    """probs float32 [b, k, g, t, s] x values [b, k, s, h] -> [b, t, n, h]."""
    b, kv_heads, g, t, s = probs.shape
    out = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(b, kv_heads, g * t, s), values.astype(jnp.float32))
    return out.reshape(b, kv_heads, g, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, -1).astype(dtype)


def masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of q over keys/values where mask [b, t, s] allows it."""
    scores = grouped_scores(q, keys)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    return grouped_output(probs, values, q.dtype)


def causal_mask(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[b, t] x [b, s] positions -> [b, t, s]: a key is visible if it is real and not in the future.

    Position -1 marks padding: padding keys are never visible.
    """
    kp = key_positions[:, None, :]
    return (kp >= 0) & (kp <= query_positions[:, :, None])
