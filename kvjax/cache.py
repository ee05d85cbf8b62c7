"""The KV-cache protocol, and the full-precision cache.

A cache is an explicit pytree that the model takes and returns, never mutates. Every cache
(`DenseCache` here, `kvjax.tiered.TieredCache`, `kvjax.teacher_forced.TeacherForcedCache`)
subclasses `KVCache` and provides what the model calls:

  begin(positions)               -> cache   routing of this step's tokens, before the layers
  update(layer, k, v, positions) -> cache   store the new tokens of one layer
  attend(layer, q, positions)    -> out     attention of q over that layer's stored tokens
  advance(positions)             -> cache   bookkeeping once all layers are done
  record_features(positions, f)  -> cache   token features, for policies that read them

and what its users need: `prefill` (a whole prompt), `filled` (given K/V), `lengths`, `nbytes`, `tokens_per_tier` and
`stored_bits` (the stats line), `segments` (runs of layers stored alike; the model scans each).
`layer` is a `kvjax.model.Layer`: its segment (static) and its index in the model (traced).
Positions are int32 [b, t]; -1 marks padding, which is neither stored nor attended.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import causal_mask, masked_attention
from kvjax.config import ModelConfig
from kvjax.model import forward


class KVCache:
    """The protocol every cache implements (see the module docstring)."""

    uses_features = False  # whether a precision policy reads token features

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError

    def begin(self, positions):
        return self

    def update(self, layer, k, v, positions):
        raise NotImplementedError

    def attend(self, layer, q, positions):
        raise NotImplementedError

    def advance(self, positions):
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1))

    def record_features(self, positions, features):
        return self

    def prefill(self, params, cfg: ModelConfig, tokens, positions, dtype):
        """Runs right-padded prompts tokens/positions [b, T] -> (logits [b, T, v], the filled cache)."""
        raise NotImplementedError

    def filled(self, k_all, v_all, positions, features=None):
        """The state decoding would leave after a sequence with these K/V [l, b, k, T, h] (benchmarks)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache arrays (exact)."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def tokens_per_tier(self) -> dict[str, jax.Array]:
        """Tokens held per tier and sequence (int32 [b] each)."""
        raise NotImplementedError

    def stored_bits(self):
        """Average bits per K/V element of the tokens that left the 16-bit window, float32 [b] (scales
        not counted; NaN where none has)."""
        raise NotImplementedError


def write_by_position(keys, values, layer, k, v, positions):
    """keys/values [l, b, k, s, h] with k, v [b, t, k, h] of `layer` written at slot = position.

    Padding (position -1) is dropped.
    """
    slots = jnp.where(positions >= 0, positions, keys.shape[3])  # out of range -> dropped
    rows = jnp.arange(k.shape[0])[:, None]
    return (keys.at[layer, rows, :, slots].set(k.astype(keys.dtype), mode="drop"),
            values.at[layer, rows, :, slots].set(v.astype(values.dtype), mode="drop"))


@struct.dataclass
class DenseCache(KVCache):
    """Policy `fp16`: keys (after RoPE) and values, one slot per position, [l, b, k, s, h]."""

    k: jax.Array  # [l, b, k, s, h]
    v: jax.Array  # [l, b, k, s, h]
    lengths: jax.Array  # int32 [b]: tokens stored per sequence (= next position)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "DenseCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def segments(self):
        return ((0, self.k.shape[0]),)

    def tokens_per_tier(self):
        return {"16-bit": self.lengths}

    def stored_bits(self):
        return jnp.full(self.lengths.shape, jnp.nan)  # no token leaves a window here

    def update(self, layer, k: jax.Array, v: jax.Array, positions: jax.Array) -> "DenseCache":
        """Writes k, v [b, t, k, h] of `layer` into slot = position (padding is dropped)."""
        keys, values = write_by_position(self.k, self.v, layer.index, k, v, positions)
        return self.replace(k=keys, v=values)

    def attend(self, layer, q: jax.Array, positions: jax.Array) -> jax.Array:
        """q [b, t, n, h] over the stored tokens of `layer` -> [b, t, n, h]."""
        b = q.shape[0]
        slot_positions = jnp.broadcast_to(jnp.arange(self.capacity), (b, self.capacity))
        mask = causal_mask(positions, slot_positions)
        return masked_attention(q, self.k[layer.index], self.v[layer.index], mask)

    def prefill(self, params, cfg, tokens, positions, dtype):
        return forward(params, cfg, tokens, positions, self, dtype)

    def filled(self, k_all, v_all, positions, features=None):
        """The state after a sequence whose K/V [l, b, k, T, h] are given (positions [b, T], 0.. per row)."""
        rows, slots = jnp.arange(positions.shape[0])[:, None], jnp.where(positions >= 0, positions, self.capacity)
        place = lambda cache, x: cache.at[:, rows, :, slots].set(x.transpose(1, 3, 0, 2, 4).astype(cache.dtype),
                                                                 mode="drop")
        return self.replace(k=place(self.k, k_all), v=place(self.v, v_all),
                            lengths=jnp.sum(positions >= 0, axis=1).astype(jnp.int32))
