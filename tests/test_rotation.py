"""kvjax.rotation: the Hadamard rotation is orthonormal, and attention over rotated K/V equals attention
over the originals (in float32, to rounding) for every choice of sides. That the step-by-step cache,
the prompt fill and the teacher-forced scorer agree under a rotation is proven with the other
policies in tests/test_policies.py (its rotated TEST_POLICIES)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import causal_mask, masked_attention
from kvjax.errors import KvjaxError
from kvjax.rotation import NONE, ROTATIONS, Rotation, hadamard


@pytest.mark.parametrize("h", [1, 2, 16, 64, 128])
def test_hadamard_is_orthonormal_with_entries_of_one_size(h):
    matrix = hadamard(h)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(h), atol=1e-12)
    np.testing.assert_allclose(np.abs(matrix), h ** -0.5)  # every channel spread evenly over all


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(KvjaxError, match="power-of-two head dimension, got 48"):
        hadamard(48)


@pytest.mark.parametrize("name", ROTATIONS)
def test_attention_over_rotated_kv_equals_the_original(name):
    rotation = Rotation.named(name)
    assert rotation.name == name
    b, t, n, k, h = 2, 11, 6, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
    kk = 3.0 * jax.random.normal(keys[1], (b, t, k, h), jnp.float32).at[..., 5].mul(20.0)  # an outlier channel
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.float32)
    positions = jnp.tile(jnp.arange(t), (b, 1))
    attend = lambda q, k, v: masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                              causal_mask(positions, positions))
    want = attend(q, kk, v)
    got = rotation.output(attend(*rotation.inputs(q, kk, v)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    rq, rk, rv = rotation.inputs(q, kk, v)
    assert (float(jnp.abs(rk - kk).max()) > 1) == rotation.keys and (float(jnp.abs(rv - v).max()) > 0.1) == rotation.values


def test_rotation_spreads_an_outlier_channel():
    x = jnp.zeros((64,)).at[5].set(8.0)
    _, k, _ = Rotation.named("keys").inputs(x[None, None, None], x[None, None, None], x[None, None, None])
    np.testing.assert_allclose(np.abs(np.asarray(k)).ravel(), 1.0, rtol=1e-6)  # 8 / sqrt(64) in every channel
    assert NONE.inputs(x, x, x)[1] is x
