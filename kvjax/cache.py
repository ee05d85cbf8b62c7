"""The KV-cache protocol, and the full-precision cache.

A cache is an explicit pytree that the model takes and returns, never mutates. Every cache
(`DenseCache` here, `kvjax.tiered.TieredCache`, `kvjax.teacher_forced.TeacherForcedCache`)
subclasses `KVCache` and provides what the model calls:

  begin(positions)                    -> cache          routing of this step's tokens, before the layers
  attend(layer, q, k, v, positions)   -> (out, cache)   one layer: attend q over every token it holds
                                                        and the new k, v (causally), and store them
  advance(positions)                  -> cache          bookkeeping once all layers are done
  record_features(positions, f)       -> cache          token features, for policies that read them

A step brings t tokens per sequence: t = 1 when decoding, a chunk of a prompt when prefilling
(kvjax.generation.prefill; at most `max_chunk`). Users also read `filled` (the state after given
K/V), `lengths`, `nbytes`, `tokens_per_tier` and `stored_bits` (the stats line), and `segments`
(runs of layers the model scans one at a time, asked after `begin`: they may differ between a
decode step and a prompt chunk). `layer` is a `kvjax.model.Layer`: its segment
(static) and its index in the model (traced). Positions are int32 [b, t], consecutive from each
row's length; -1 marks padding, which is neither stored nor attended.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import causal_mask
from kvjax.config import ModelConfig
from kvjax.kernels import Backend, Kernels, resolve
from kvjax.rotation import NONE
from kvjax.stores import after_reading, write_slots
from pallas_kernels.xla_attention import CHUNK_SLOTS, Part, merge_partials, slices


class KVCache:
    """The protocol every cache implements (see the module docstring)."""

    uses_features = False  # whether a precision policy reads token features
    max_chunk = None  # most tokens per sequence one step may bring (None: any)
    rotation = NONE  # how the model rotates the K/V it hands `attend` (kvjax.rotation; quantized caches: their layout's)

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
    slots = jnp.where(positions >= 0, positions, keys.shape[3])  # out of range: not written
    return write_slots(keys, slots, k, layer), write_slots(values, slots, v, layer)


@struct.dataclass
class DenseCache(KVCache):
    """Policy `fp16`: keys (after RoPE) and values in 16 bits, one slot per position, [l, b, k, s, h].

    A decode step attends through the backend (on a CPU the C++ kernel reads the layer in place,
    as it reads the quantized caches' windows); a chunk of prompt tokens through the backend's
    `chunk_partials` (on a CPU the C++ chunk kernel), skipping the blocks no query sees yet (causal)."""

    k: jax.Array  # [l, b, k, s, h]
    v: jax.Array  # [l, b, k, s, h]
    lengths: jax.Array  # int32 [b]: tokens stored per sequence (= next position)
    backend: Backend = struct.field(pytree_node=False, default=Backend())

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float16,
             kernels: Kernels | str | Backend = Kernels.REFERENCE) -> "DenseCache":
        """`dtype`: what K/V are stored in (see `storage_dtype`); `kernels`: how decode steps attend."""
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32),
                   backend=resolve(kernels))

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
        """Attends q [b, t, n, h] over the stored tokens and k, v [b, t, k, h] (causally), and stores
        k, v at slot = position (padding is dropped)."""
        if q.shape[1] == 1:
            return self._decode_step(layer, q, k, v, positions)
        keys, values = write_by_position(self.k, self.v, layer.index, k, v, positions)
        b = q.shape[0]
        slot_positions = jnp.broadcast_to(jnp.arange(self.capacity), (b, self.capacity))
        parts = self.backend.chunk_partials(q, [(slices(keys, values, layer.index),
                                                 causal_mask(positions, slot_positions), CHUNK_SLOTS)],
                                            kv_heads=k.shape[2])
        return merge_partials([parts]).astype(q.dtype), self.replace(k=keys, v=values)

    def _decode_step(self, layer, q, k, v, positions):
        """One token per sequence: the stored tokens (read in place) and this one, through the backend;
        the token is written after the attention read the layer (so XLA writes in place)."""
        p = positions[:, 0]  # [b]
        stored = Part.floats(self.k, self.v, jnp.arange(self.capacity)[None, :] < p[:, None], layer.index)
        token = Part.floats(k.astype(self.k.dtype).transpose(0, 2, 1, 3)[None], v.astype(self.v.dtype)
                            .transpose(0, 2, 1, 3)[None], positions >= 0, 0)  # [1, b, k, 1, h]
        out = self.backend.attend(q[:, 0], [stored, token], group_size=1)
        read = out.reshape(-1)[0]
        keys, values = write_by_position(self.k, self.v, layer.index, after_reading(read, k),
                                         after_reading(read, v), positions)
        return out[:, None].astype(q.dtype), self.replace(k=keys, v=values)

    def filled(self, k_all, v_all, positions, features=None):
        """The state after a sequence whose K/V [l, b, k, T, h] are given (positions [b, T], 0.. per row)."""
        slots = jnp.where(positions >= 0, positions, self.capacity)
        return self.replace(k=write_slots(self.k, slots, k_all), v=write_slots(self.v, slots, v_all),
                            lengths=jnp.sum(positions >= 0, axis=1).astype(jnp.int32))
