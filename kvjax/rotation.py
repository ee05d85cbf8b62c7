"""An orthogonal rotation of keys and values before a quantized cache stores them (issue #32).

A few channels of a head's keys and values carry most of their magnitude; a 2-bit grid put over
such a group spends its four levels on the outliers. A randomized Hadamard matrix R (h x h,
orthonormal: random signs times a Sylvester Hadamard matrix / sqrt(h)) spreads every channel over
all of them, and attention undoes it exactly in exact arithmetic:

  keys:    (q R) . (k R) = q . k                 rotate the queries and the keys
  values:  sum_j p_j (v_j R) R^T = sum_j p_j v_j  rotate the values, the output back once per head

The model applies it around each layer's `cache.attend` (kvjax.model.Block), so the step-by-step
cache, the prompt fill and the teacher-forced scorer store and read the same rotated K/V by
construction, and every kernel runs unchanged. A cache names its rotation in its `Layout`; the full
precision cache rotates nothing. Per-channel (KIVI) keys and rotations interact, so keys and values
are chosen apart: `ROTATIONS`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import KvjaxError

ROTATIONS = ("none", "keys", "values", "both")  # what a policy's `rotate` may say
SEED = 0  # of the random signs: one matrix for every layer and head, the same on every machine
# Policy-name suffixes of the rotations (`kivi2+rot`; kvjax.policies.split_rotation reads them), also
# the shipped allocation files' suffixes with "-" for "+".
SUFFIXES = {"+rot": "both", "+rotk": "keys", "+rotv": "values"}


def suffix_of(rotate: str) -> str:
    """The name suffix of a rotation ("" for none)."""
    return {v: k for k, v in SUFFIXES.items()}.get(rotate, "")


@functools.cache
def hadamard(h: int) -> np.ndarray:
    """float64 [h, h]: diag(random signs) @ Sylvester Hadamard / sqrt(h), orthonormal (h a power of two)."""
    if h < 1 or h & (h - 1):
        raise KvjaxError(f"a Hadamard rotation needs a power-of-two head dimension, got {h}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < h:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    signs = np.random.default_rng(SEED).choice([-1.0, 1.0], size=h)
    return signs[:, None] * matrix / np.sqrt(h)


def _times(x, matrix):
    """x [..., h] @ matrix [h, h], in float32 at full precision, back in x's dtype."""
    return jnp.einsum("...h,hj->...j", x.astype(jnp.float32), jnp.asarray(matrix, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rotation:
    """Which sides a cache stores rotated (static: part of a Layout)."""

    keys: bool = False
    values: bool = False

    @classmethod
    def named(cls, name: str) -> "Rotation":
        """The rotation called `name`, one of ROTATIONS."""
        if name not in ROTATIONS:
            raise KvjaxError(f"unknown rotation {name!r}; known: {', '.join(ROTATIONS)}")
        return cls(keys=name in ("keys", "both"), values=name in ("values", "both"))

    @property
    def name(self) -> str:
        return ROTATIONS[self.keys + 2 * self.values]

    def check(self, head_dim: int):
        """Raises a KvjaxError unless this rotation can act on heads of `head_dim` channels."""
        if self.keys or self.values:
            hadamard(head_dim)

    def inputs(self, q, k, v):
        """A layer's q [b, t, n, h] and k, v [b, t, k, h] as the cache takes them."""
        if self.keys:
            matrix = hadamard(q.shape[-1])
            q, k = _times(q, matrix), _times(k, matrix)
        if self.values:
            v = _times(v, hadamard(v.shape[-1]))
        return q, k, v

    def output(self, out):
        """The attention output [b, t, n, h] of rotated values, rotated back."""
        return _times(out, hadamard(out.shape[-1]).T) if self.values else out


NONE = Rotation()
