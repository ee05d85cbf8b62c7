"""The KV cache: an explicit pytree that the model takes and returns, never mutates.

`DenseCache` is the full-precision cache (policy `fp16`): keys (after RoPE) and values
in the compute dtype, one slot per position, [l, b, k, s, h]. Quantized caches
(kvjax.tiered, kvjax.teacher_forced) provide the same methods, which the model calls:

  begin(positions)               -> cache   routing of this step's tokens, before the layers
  update(layer, k, v, positions) -> cache   store the new tokens of one layer
  attend(layer, q, positions)    -> out     attention of q over that layer's stored tokens
  advance(positions)             -> cache   bookkeeping once all layers are done

Positions are int32 [b, t]; -1 marks padding, which is neither stored nor attended.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import causal_mask, masked_attention
from kvjax.config import ModelConfig


def write_by_position(keys, values, layer, k, v, positions):
    """keys/values [l, b, k, s, h] with k, v [b, t, k, h] of `layer` written at slot = position.

    Padding (position -1) is dropped.
    """
    slots = jnp.where(positions >= 0, positions, keys.shape[3])  # out of range -> dropped
    rows = jnp.arange(k.shape[0])[:, None]
    return (keys.at[layer, rows, :, slots].set(k.astype(keys.dtype), mode="drop"),
            values.at[layer, rows, :, slots].set(v.astype(values.dtype), mode="drop"))


@struct.dataclass
class DenseCache:
    k: jax.Array  # [l, b, k, s, h]
    v: jax.Array  # [l, b, k, s, h]
    lengths: jax.Array  # int32 [b]: tokens stored per sequence (= next position)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "DenseCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache arrays (exact)."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    uses_features = False  # no precision policy reads token features

    def tokens_per_tier(self) -> dict[str, jax.Array]:
        return {"16-bit": self.lengths}

    def begin(self, positions) -> "DenseCache":
        return self

    def record_features(self, positions, features) -> "DenseCache":
        return self

    def update(self, layer, k: jax.Array, v: jax.Array, positions: jax.Array) -> "DenseCache":
        """Writes k, v [b, t, k, h] of `layer` into slot = position (padding is dropped)."""
        keys, values = write_by_position(self.k, self.v, layer, k, v, positions)
        return self.replace(k=keys, v=values)

    def attend(self, layer, q: jax.Array, positions: jax.Array) -> jax.Array:
        """q [b, t, n, h] over the stored tokens of `layer` -> [b, t, n, h]."""
        b = q.shape[0]
        slot_positions = jnp.broadcast_to(jnp.arange(self.capacity), (b, self.capacity))
        mask = causal_mask(positions, slot_positions)
        return masked_attention(q, self.k[layer], self.v[layer], mask)

    def advance(self, positions: jax.Array) -> "DenseCache":
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1))
