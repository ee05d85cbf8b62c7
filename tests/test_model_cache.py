"""Cache vs no cache: prefill + step-by-step decode equals the full-sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import DenseCache
from kvjax.config import get_preset
from kvjax.generation import pad_prompts
from kvjax.model import forward, init_params

CFG = get_preset("tiny")
jit_forward = jax.jit(forward, static_argnums=1)


def test_prefill_then_decode_equals_full_forward_ragged_batch():
    params = init_params(CFG, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompt_lengths, total = [3, 9, 6], 14  # each row: its prompt, then its own continuation
    seqs = [rng.integers(0, CFG.vocab_size, total) for _ in prompt_lengths]

    full_logits = [jit_forward(params, CFG, jnp.asarray(s)[None], jnp.arange(total)[None])[0][0] for s in seqs]

    tokens, positions = pad_prompts([list(s[:n]) for s, n in zip(seqs, prompt_lengths)])
    cache = DenseCache.init(CFG, len(seqs), capacity=total + 2, dtype=jnp.float32)  # the plain forward keeps float32
    logits, cache = jit_forward(params, CFG, tokens, positions, cache)
    for row, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(logits[row, :n], full_logits[row][:n], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, prompt_lengths)

    step = 0
    while True:  # every row decodes its own next token at its own position
        pos = np.array([n + step for n in prompt_lengths])
        active = pos < total
        if not active.any():
            break
        tok = np.array([s[min(p, total - 1)] for s, p in zip(seqs, pos)])
        logits, cache = jit_forward(params, CFG, jnp.asarray(tok)[:, None],
                                    jnp.asarray(np.where(active, pos, -1))[:, None], cache)
        for row in np.flatnonzero(active):
            np.testing.assert_allclose(logits[row, 0], full_logits[row][pos[row]], atol=1e-5, rtol=1e-5)
        step += 1
    np.testing.assert_array_equal(cache.lengths, [total] * 3)


def test_padding_tokens_change_nothing():
    """Padding (position -1) is masked before any reduction, so what the padded slots hold cannot
    reach a real token: two batches that differ only there give bit-identical logits.

    Against an unpadded forward of the 5 real tokens alone the logits agree to float32 rounding
    only (measured up to 1.7e-6 on an Intel Xeon): the matmuls then have other shapes, which XLA's
    CPU kernels may sum in another order. That is summation order, not a leak."""
    params = init_params(CFG, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (1, 8)))
    padded_pos = jnp.asarray([[0, 1, 2, 3, 4, -1, -1, -1]])
    padded, _ = jit_forward(params, CFG, tokens, padded_pos)
    other, _ = jit_forward(params, CFG, tokens.at[:, 5:].set(jnp.asarray([[7, 9, 200]])), padded_pos)
    np.testing.assert_array_equal(padded[:, :5], other[:, :5])
    plain, _ = jit_forward(params, CFG, tokens[:, :5], jnp.arange(5)[None])
    np.testing.assert_allclose(padded[:, :5], plain, atol=1e-5, rtol=1e-5)


def test_cache_nbytes_is_exact():
    cache = DenseCache.init(CFG, batch=2, capacity=10, dtype=jnp.bfloat16)
    per_tensor = CFG.num_layers * 2 * CFG.num_kv_heads * 10 * CFG.head_dim * 2
    assert cache.nbytes == 2 * per_tensor + 2 * 4
