"""Sampling filters with explicit PRNG keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.errors import KvjaxError
from kvjax.sampling import SamplingConfig, sample

LOGITS = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)


def test_greedy_is_argmax():
    np.testing.assert_array_equal(sample(LOGITS, jax.random.PRNGKey(0), SamplingConfig()), LOGITS.argmax(-1))


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=1.0, top_p=1e-6)])
def test_tightest_filters_are_greedy(cfg):
    for seed in range(5):
        np.testing.assert_array_equal(sample(LOGITS, jax.random.PRNGKey(seed), cfg), LOGITS.argmax(-1))


def test_same_key_same_tokens_and_keys_matter():
    cfg = SamplingConfig(temperature=1.0)
    a = [np.asarray(sample(LOGITS, jax.random.PRNGKey(s), cfg)) for s in range(8)]
    np.testing.assert_array_equal(a[0], np.asarray(sample(LOGITS, jax.random.PRNGKey(0), cfg)))
    assert len({tuple(x) for x in a}) > 1


def test_top_k_and_top_p_stay_inside_their_sets():
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    top3 = np.argsort(-np.asarray(LOGITS), -1)[:, :3]
    draws = np.stack([sample(LOGITS, k, SamplingConfig(temperature=1.0, top_k=3)) for k in keys])
    assert all(set(draws[:, r]) <= set(top3[r]) for r in range(4))

    probs = np.asarray(jax.nn.softmax(LOGITS, -1))
    draws = np.stack([sample(LOGITS, k, SamplingConfig(temperature=1.0, top_p=0.5)) for k in keys])
    for r in range(4):
        order = np.argsort(-probs[r])
        nucleus = order[:np.searchsorted(np.cumsum(probs[r][order]), 0.5) + 1]
        assert set(draws[:, r]) <= set(nucleus)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_values_are_clear_errors(kwargs):
    with pytest.raises(KvjaxError):
        SamplingConfig(**kwargs)
