"""Step-by-step decoding that stores the teacher-forced path's K/V: equivalence proofs that hold on any CPU.

Why: the two paths of an equivalence proof compute K/V with matmuls of different shapes ([b, 1] per
step against [b, T] at once). XLA's CPU kernels may sum those in a different order, so a key can
differ by an ulp between the paths; if it lies within an ulp of a rounding boundary of the
quantizer, one code flips and the logits move by ~1e-3. Whether that happens depends on the CPU,
not on the cache.

So the proofs never quantize two different numbers. `Replay` wraps a step-by-step cache: each
layer's `attend` stores the reference K/V (the teacher-forced path's, for the same positions)
instead of the step's own, and `record_features` the reference features; it keeps the largest
difference between the two (`drift`, of K/V relative to their size), which the tests bound: the
reference is stored in 16 bits, so a difference of an ulp of float16 is expected. Both paths then quantize identical
floats with the same element-wise codecs (min/max, subtract, divide, round: exact IEEE operations
whatever the array shape), so they hold every token in bit-identical state by construction, and
their logits differ only by summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Replay:
    inner: object  # the cache under test
    k_ref: jax.Array  # [l, b, k, T, h]: reference keys (after RoPE), token j at index j
    v_ref: jax.Array  # [l, b, k, T, h]
    features_ref: jax.Array  # float32 [b, T, F]
    drift: jax.Array  # float32 [2]: max |own - reference| / max(|reference|, 1) of K/V, and max |own - ref| of features

    @classmethod
    def around(cls, inner, tf_cache, features):
        """Replays the K/V of a TeacherForcedCache (and its features [b, T, F]) into `inner` (copies of
        them: a step that donates its cache, as prefill does, must not delete the caller's arrays)."""
        copy = lambda x: jnp.array(x, copy=True)
        return cls(inner, copy(tf_cache.k), copy(tf_cache.v), copy(features), jnp.zeros((2,), jnp.float32))

    @property
    def uses_features(self):
        return self.inner.uses_features

    def begin(self, positions):
        return self.replace(inner=self.inner.begin(positions))

    def attend(self, layer, q, k, v, positions):
        """k, v [b, t, k, h] at positions [b, t]: stores the reference K/V of those positions instead."""
        take = lambda ref: jnp.take_along_axis(ref[layer.index], jnp.maximum(positions, 0)[:, None, :, None],
                                               axis=2).transpose(0, 2, 1, 3)  # [b, t, k, h]
        k_ref, v_ref = take(self.k_ref).astype(k.dtype), take(self.v_ref).astype(v.dtype)
        real = (positions >= 0)[:, :, None, None]
        relative = lambda own, ref: jnp.abs(own - ref) / jnp.maximum(jnp.abs(ref), 1.0)
        diff = jnp.max(jnp.where(real, jnp.maximum(relative(k, k_ref), relative(v, v_ref)), 0.0))
        out, inner = self.inner.attend(layer, q, k_ref, v_ref, positions)
        return out, self.replace(inner=inner, drift=self.drift.at[0].max(diff.astype(jnp.float32)))

    def advance(self, positions):
        return self.replace(inner=self.inner.advance(positions))

    def record_features(self, positions, features):
        ref = jnp.take_along_axis(self.features_ref, jnp.maximum(positions, 0)[:, :, None], axis=1)
        diff = jnp.max(jnp.where((positions >= 0)[:, :, None], jnp.abs(features - ref), 0.0))
        return self.replace(inner=self.inner.record_features(positions, ref), drift=self.drift.at[1].max(diff))

    def __getattr__(self, name):  # lengths, tokens_per_tier, ...: the inner cache's
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
