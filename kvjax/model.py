"""Llama-architecture decoder (SmolLM) as a pure-functional Flax module.

    logits, cache = Llama(cfg).apply({"params": params}, tokens, positions, cache)

tokens int32 [b, t]; positions int32 [b, t] (-1 marks right padding); cache is an
explicit pytree (kvjax.cache) or None for a plain causal forward over the t tokens.
Layers are stacked ([l, ...] params) and run with a scan, so the step compiles once
whatever the depth. Shape letters: see kvjax.config.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.attention import causal_mask, masked_attention
from kvjax.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF `rotate_half` layout: x [b, t, heads, h], positions [b, t]."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [h/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, h]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed.astype(self.dtype) * scale.astype(self.dtype))


class Block(nn.Module):
    """One decoder layer; the cache (all layers) rides in the scan carry."""

    cfg: ModelConfig
    dtype: Any
    token_stats: bool = False
    queries: bool = False

    @nn.compact
    def __call__(self, carry, layer: jax.Array, positions: jax.Array):
        x, cache = carry  # x [b, t, d]
        cfg, b, t = self.cfg, x.shape[0], x.shape[1]
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="attn_norm")(x)
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj")(h).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj")(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj")(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)

        if cache is None:
            mask = causal_mask(positions, positions)
            attn = masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        else:
            cache = cache.update(layer, k, v, positions)
            attn = cache.attend(layer, q, positions)
        x = x + dense(cfg.hidden_size, "o_proj")(attn.reshape(b, t, -1))

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="mlp_norm")(x)
        gate = dense(cfg.intermediate_size, "gate_proj")(h)
        up = dense(cfg.intermediate_size, "up_proj")(h)
        x = x + dense(cfg.hidden_size, "down_proj")(nn.silu(gate) * up)
        stats = layer_token_stats(q, k, v) if self.token_stats else None
        return (x, cache), ((stats, q) if self.queries else stats)


def layer_token_stats(q, k, v):
    """Per-token statistics of one layer's own q [b, t, n, h], k, v [b, t, k, h] -> float32 [b, t, 3]:
    mean key norm and mean value norm over kv heads, and the variance across query heads of
    the token's attention score on its own key (q.k / sqrt(h))."""
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    b, t, n, h = q.shape
    g = n // k.shape[2]
    self_score = jnp.einsum("btkgh,btkh->btkg", q.reshape(b, t, k.shape[2], g, h), k).reshape(b, t, n) * h**-0.5
    return jnp.stack([jnp.linalg.norm(k, axis=-1).mean(-1), jnp.linalg.norm(v, axis=-1).mean(-1),
                      jnp.var(self_score, axis=-1)], axis=-1)


class Llama(nn.Module):
    """Decoder-only Llama: embed -> l x Block -> RMSNorm -> logits (float32)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    token_stats: bool = False  # also return per-layer token statistics [l, b, t, 3] (layer_token_stats)
    queries: bool = False  # with token_stats: return (stats, queries [l, b, t, n, h] after RoPE)

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache=None):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed")
        x = embed(tokens)
        if cache is not None:
            cache = cache.begin(positions)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=cfg.num_layers)(cfg, self.dtype, self.token_stats, self.queries,
                                                                  name="layers")
        (x, cache), stats = layers((x, cache), jnp.arange(cfg.num_layers), positions)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(x)
        if cache is not None:
            cache = cache.advance(positions)
        if self.token_stats:
            return logits.astype(jnp.float32), cache, stats
        return logits.astype(jnp.float32), cache


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32):
    """Random params of the real shapes (Flax's default initializers), for tests and speed work."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Llama(cfg).init(rng, tokens, tokens)["params"]
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def forward(params, cfg: ModelConfig, tokens, positions, cache=None, dtype=jnp.float32):
    """Functional entry point: (logits float32 [b, t, v], new cache)."""
    return Llama(cfg, dtype).apply({"params": params}, tokens, positions, cache)


def forward_with_stats(params, cfg: ModelConfig, tokens, positions, cache=None, dtype=jnp.float32,
                       queries: bool = False):
    """`forward` that also returns each layer's token statistics float32 [l, b, t, 3] (for features);
    with `queries`, (stats, queries [l, b, t, n, h]) (for controller training traces)."""
    return Llama(cfg, dtype, token_stats=True, queries=queries).apply({"params": params}, tokens, positions,
                                                                       cache)
