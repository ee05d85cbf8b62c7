"""The KV-cache protocol, and the full-precision cache.

A cache is an explicit pytree that the model takes and returns, never mutates. Every cache
(`DenseCache` here, `kvjax.tiered.TieredCache`, `kvjax.teacher_forced.TeacherForcedCache`)
subclasses `KVCache` and provides what the model calls:

  begin(positions)                    -> cache          routing of this step's tokens, before the layers
  attend(layer, q, k, v, positions)   -> (out, cache)   one layer: store its new k, v and attend q
                                                        over every token it holds
  advance(positions)                  -> cache          bookkeeping once all layers are done
  record_features(positions, f)       -> cache          token features, for policies that read them

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

    def attend(self, layer, q, k, v, positions):
        """q [b, t, n, h]; k, v [b, t, k, h] of `layer` at positions [b, t] -> (out [b, t, n, h], cache)."""
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


def storage_dtype(dtype, kv_dtype=None):
    """The dtype a cache stores 16-bit K/V in: `kv_dtype` if given, else the compute dtype if it is
    16-bit, else float16 (a float32 model on a CPU still gets a 16-bit cache, as its bytes are counted)."""
    if kv_dtype is not None:
        return jnp.dtype(kv_dtype)
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float16)


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
    """Policy `fp16`: keys (after RoPE) and values in 16 bits, one slot per position, [l, b, k, s, h]."""

    k: jax.Array  # [l, b, k, s, h]
    v: jax.Array  # [l, b, k, s, h]
    lengths: jax.Array  # int32 [b]: tokens stored per sequence (= next position)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float16) -> "DenseCache":
        """`dtype`: what K/V are stored in (see `storage_dtype`)."""
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

    def attend(self, layer, q, k, v, positions):
        """Writes k, v [b, t, k, h] of `layer` into slot = position (padding is dropped), then attends q
        [b, t, n, h] over the stored tokens."""
        keys, values = write_by_position(self.k, self.v, layer.index, k, v, positions)
        b = q.shape[0]
        slot_positions = jnp.broadcast_to(jnp.arange(self.capacity), (b, self.capacity))
        out = masked_attention(q, keys[layer.index], values[layer.index], causal_mask(positions, slot_positions))
        return out, self.replace(k=keys, v=values)

    def prefill(self, params, cfg, tokens, positions, dtype):
        return forward(params, cfg, tokens, positions, self, dtype)

    def filled(self, k_all, v_all, positions, features=None):
        """The state after a sequence whose K/V [l, b, k, T, h] are given (positions [b, T], 0.. per row)."""
        rows, slots = jnp.arange(positions.shape[0])[:, None], jnp.where(positions >= 0, positions, self.capacity)
        place = lambda cache, x: cache.at[:, rows, :, slots].set(x.transpose(1, 3, 0, 2, 4).astype(cache.dtype),
                                                                 mode="drop")
        return self.replace(k=place(self.k, k_all), v=place(self.v, v_all),
                            lengths=jnp.sum(positions >= 0, axis=1).astype(jnp.int32))
