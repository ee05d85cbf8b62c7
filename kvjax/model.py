"""Llama-architecture decoder (SmolLM): pure functions over a params pytree, Flax modules inside.

    logits, cache = forward(params, cfg, tokens, positions, cache)

tokens int32 [b, t]; positions int32 [b, t] (-1 marks right padding); cache is an
explicit pytree (kvjax.cache.KVCache) or None for a plain causal forward over the t tokens.
Layers are stacked ([l, ...] params) and run with a scan, so the step compiles once
whatever the depth; a cache may split the layers into segments (its `segments`, asked after
`begin`), one scan each: a decode step of a cache whose widths differ by layer scans each run of
equal widths, a prompt chunk every layer at once (kvjax.layout). A matrix is a float array or a kvjax.weights.BlockMatrix (a GGUF's
blocks, kept: `--weights`), which the layers hand whole to `weights.linear` with their index.
Shape letters: see kvjax.config.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax import weights
from kvjax.attention import causal_mask, masked_attention
from kvjax.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Layer(NamedTuple):
    """How the model names a layer to its cache."""

    segment: int  # static: which run of equally stored layers (the cache's `segments`)
    index: jax.Array  # int32 []: the layer's index in the model


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
    segment: int = 0  # the cache's segment this layer is in (kvjax.layout.Layout.segments)

    @nn.compact
    def __call__(self, carry, layer: jax.Array, positions: jax.Array, blocks=None):
        x, cache = carry  # x [b, t, d]
        cfg, b, t = self.cfg, x.shape[0], x.shape[1]
        blocks = blocks or {}  # name -> weights.BlockMatrix of all layers, read at `layer`

        def dense(features, name):
            if name in blocks:
                return lambda h: weights.linear(h.astype(self.dtype), blocks[name], layer)
            return nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="attn_norm")(x)
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj")(h).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj")(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj")(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)

        if cache is None:
            mask = causal_mask(positions, positions)
            attn = masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        else:  # a quantized cache may store its K/V rotated (kvjax.rotation): exact in exact arithmetic
            attn, cache = cache.attend(Layer(self.segment, layer), *cache.rotation.inputs(q, k, v), positions)
            attn = cache.rotation.output(attn)
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


def _embed(cfg: ModelConfig, dtype):
    return nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype)


def embed(params, cfg: ModelConfig, tokens, dtype):
    """tokens int32 [b, t] -> their embeddings [b, t, d]."""
    table = params["embed"]["embedding"]
    if isinstance(table, weights.BlockMatrix):
        return weights.take_rows(table, tokens, dtype)
    return _embed(cfg, dtype).apply({"params": params["embed"]}, tokens)


def _apply(params, cfg: ModelConfig, tokens, positions, cache, dtype, token_stats: bool, queries: bool):
    """embed -> the layers, one scan per cache segment -> RMSNorm: hidden states [b, t, d] (and cache, stats)."""
    x = embed(params, cfg, tokens, dtype)
    if cache is not None:
        cache = cache.begin(positions)
    segments = ((0, cfg.num_layers),) if cache is None else cache.segments
    floats, blocks = weights.split_layers(params["layers"])
    outs = []
    for s, (start, stop) in enumerate(segments):
        block = Block(cfg, dtype, token_stats, queries, segment=s)

        def body(carry, layer, block=block):
            layer_params = jax.tree_util.tree_map(  # a dynamic slice per weight (quicker to trace than a[layer])
                lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), floats)
            return block.apply({"params": layer_params}, carry, layer, positions, blocks)

        # The barrier keeps a one-layer segment's index a runtime value: XLA folds a constant index
        # into a static slice of every weight, which XLA:CPU copies out several times slower.
        layers = jax.lax.optimization_barrier(jnp.arange(start, stop))
        (x, cache), out = jax.lax.scan(body, (x, cache), layers)
        outs.append(out)
    x = RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": params["final_norm"]}, x)
    if cache is not None:
        cache = cache.advance(positions)
    stats = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *outs) if token_stats else None
    return x, cache, stats


def head(params, cfg: ModelConfig, x, dtype=jnp.float32):
    """The output head: hidden states x [..., d] (after the final norm) -> logits float32 [..., v]."""
    matrix = params["embed"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    if isinstance(matrix, weights.BlockMatrix):
        logits = weights.linear(x.astype(dtype), matrix)
    elif cfg.tie_word_embeddings:  # x . embedding rows, without transposing the [v, d] table (XLA copied it each step)
        logits = jnp.einsum("...d,vd->...v", x.astype(dtype), matrix.astype(dtype))
    else:
        logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype).apply({"params": params["lm_head"]}, x)
    return logits.astype(jnp.float32)


LOGIT_BLOCK = 256  # positions per block of `target_logprobs`


def target_logprobs(params, cfg: ModelConfig, x, targets, dtype=jnp.float32):
    """log p(targets [b, T]) from hidden states x [b, T, d] -> (float32 [b, T], bool [b, T]: whether each
    target is the argmax, the first of equals, as greedy decoding picks); the head runs LOGIT_BLOCK positions at a time, so a long text
    never holds its [b, T, v] logits."""
    b, T, _ = x.shape
    blocks = -(-T // LOGIT_BLOCK)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, blocks * LOGIT_BLOCK - T)) + ((0, 0),) * (a.ndim - 2))
    by_block = lambda a: pad(a).reshape(b, blocks, LOGIT_BLOCK, *a.shape[2:]).swapaxes(0, 1)

    def one(args):
        xb, yb = args  # [b, B, d], [b, B]
        logits = head(params, cfg, xb, dtype)
        target = jnp.take_along_axis(logits, yb[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == yb  # ties: the first

    unblock = lambda a: a.swapaxes(0, 1).reshape(b, -1)[:, :T]
    logp, top = jax.lax.map(one, (by_block(x), by_block(targets)))
    return unblock(logp), unblock(top)


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32):
    """Random params of the real shapes (Flax's default initializers), for tests and speed work.

    The tree: embed/embedding [v, d], layers/<name>/kernel|scale stacked on a leading [l] axis,
    final_norm/scale, and lm_head/kernel unless the embeddings are tied (kvjax.loading builds it too).
    """
    k_embed, k_layers, k_head = jax.random.split(rng, 3)
    tokens = jnp.zeros((1, 1), jnp.int32)
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    init_layer = lambda key: Block(cfg, jnp.float32).init(key, (x, None), jnp.int32(0), tokens)["params"]
    params = {"embed": _embed(cfg, jnp.float32).init(k_embed, tokens)["params"],
              "layers": jax.vmap(init_layer)(jax.random.split(k_layers, cfg.num_layers)),
              "final_norm": {"scale": jnp.ones((cfg.hidden_size,), jnp.float32)}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = nn.Dense(cfg.vocab_size, use_bias=False).init(k_head, x)["params"]
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)


def forward(params, cfg: ModelConfig, tokens, positions, cache=None, dtype=jnp.float32):
    """Functional entry point: (logits float32 [b, t, v], new cache)."""
    x, cache, _ = _apply(params, cfg, tokens, positions, cache, dtype, False, False)
    return head(params, cfg, x, dtype), cache


def hidden_states(params, cfg: ModelConfig, tokens, positions, cache=None, dtype=jnp.float32, token_stats=False):
    """`forward` without the output head: (hidden states [b, t, d] after the final norm, new cache,
    each layer's token statistics [l, b, t, 3] if `token_stats`, else None). `head` turns the rows
    that need them into logits (a prompt needs its last)."""
    return _apply(params, cfg, tokens, positions, cache, dtype, token_stats, False)


def forward_with_stats(params, cfg: ModelConfig, tokens, positions, cache=None, dtype=jnp.float32,
                       queries: bool = False):
    """`forward` that also returns each layer's token statistics float32 [l, b, t, 3] (for features);
    with `queries`, (stats, queries [l, b, t, n, h]) (for controller training traces)."""
    x, cache, stats = _apply(params, cfg, tokens, positions, cache, dtype, True, queries)
    return head(params, cfg, x, dtype), cache, stats
