"""Exact teacher-forced scoring through a quantized cache policy, and prompt prefill.

`score` runs a whole sequence in parallel while every query attends to each earlier token
in exactly the state the step-by-step cache (kvjax.tiered) would hold it in at that step:

  token j, seen from query p        state
  j < S (sink), or p - j < W        16 bits (window)
  otherwise, j has left the window  its width w_j: evicted (streaming), 16 bits (kept), or
                                    quantized: value per token at once; key per channel once
                                    the G-th token of its width group has left too
                                    (p >= position of that token + W), else 16 bits
                                    band policies: 4 bits as above, then 2 bits (re-quantized
                                    from 4) once the group n4/G groups later has started

Widths come from `kvjax.policies`. A policy that reads model outputs (features) decides a
token's width from its own step, and that width matters only W steps later, so such
policies are scored block by block, W queries at a time; the others in one pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import codecs
from kvjax.attention import MASK_VALUE, causal_mask, grouped_output, grouped_scores
from kvjax.cache import write_by_position
from kvjax.config import ModelConfig
from kvjax.features import NUM_FEATURES, token_features
from kvjax.model import forward, forward_with_stats
from kvjax.policies import EVICTED, PolicySpec, preferred_widths, resolve_widths, tier_onehot
from kvjax.tiered import TieredCache

UNDECIDED = -1


@struct.dataclass
class TeacherForcedCache:
    """All tokens' 16-bit K/V plus their widths; attention applies each query's exact state."""

    k: jax.Array  # [l, b, k, T, h]
    v: jax.Array  # [l, b, k, T, h]
    widths: jax.Array  # int32 [b, T]: resolved widths (UNDECIDED until known)
    lengths: jax.Array  # int32 [b]
    spec: PolicySpec = struct.field(pytree_node=False)
    band_slots: int = struct.field(pytree_node=False, default=0)  # band policies: the 4-bit ring's size

    @classmethod
    def init(cls, spec: PolicySpec, cfg: ModelConfig, batch: int, length: int, dtype, band_slots: int = 0):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.full((batch, length), UNDECIDED, jnp.int32), jnp.zeros((batch,), jnp.int32), spec,
                   band_slots)

    def begin(self, positions):
        return self

    def update(self, layer, k, v, positions):
        keys, values = write_by_position(self.k, self.v, layer, k, v, positions)
        return self.replace(k=keys, v=values)

    def advance(self, positions):
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1))

    def attend(self, layer, q, positions):
        """q [b, t, n, h] at `positions` over all tokens, each in its state at that query's step."""
        spec = self.spec
        keys, values = self.k[layer], self.v[layer]  # [b, k, T, h]
        b, _, T, _ = keys.shape
        j = jnp.arange(T)
        qp = positions[:, :, None]  # [b, t, 1]
        left = spec.has_left(j, qp)  # [b, t, T]
        parts = self._band_parts(keys, values, left, qp) if spec.band else self._width_parts(keys, values, left, qp)
        visible = causal_mask(positions, jnp.broadcast_to(j, (b, T)))
        if spec.evict:
            visible &= ~(left & (self.widths == EVICTED)[:, None, :])
        scores = grouped_scores(q, keys)
        for key_mask, kq, _, _ in parts:
            scores = jnp.where(key_mask[:, None, None], grouped_scores(q, kq), scores)
        probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, MASK_VALUE), axis=-1)
        out, full = 0.0, 1.0
        for _, _, value_mask, vq in parts:
            mask = value_mask[:, None, None].astype(probs.dtype)
            out, full = out + grouped_output(probs * mask, vq, jnp.float32), full - mask
        out = out + grouped_output(probs * full, values, jnp.float32)
        return out.astype(q.dtype)

    def _width_parts(self, keys, values, left, qp):
        """[(key mask [b, t, T], keys, value mask, values)]: where each query reads a quantized K/V."""
        spec = self.spec
        q_keys, q_values = keys, values
        key_quantized = jnp.zeros(left.shape, bool)
        value_quantized = jnp.zeros(left.shape, bool)
        for bits in spec.quant_widths:
            is_w = (self.widths == bits)[:, None, :]  # [b, 1, T]
            kq, vq, ready = _roundtrip(spec, keys, values, self.widths == bits, bits)
            q_keys = jnp.where(is_w[:, :, :, None], kq, q_keys)
            q_values = jnp.where(is_w[:, :, :, None], vq, q_values)
            key_quantized |= left & is_w & (ready[:, None, :] <= qp)
            value_quantized |= left & is_w
        return [(key_quantized, q_keys, value_quantized, q_values)]

    def _band_parts(self, keys, values, left, qp):
        """Band policies: the 4-bit parts, then the 2-bit parts of the demoted groups."""
        members = self.widths == 4  # [b, T]: every token that leaves the window enters the band
        k4, v4, ready = _roundtrip(self.spec, keys, values, members, 4)
        k2, v2, _ = _roundtrip(self.spec, k4, v4, members, 2)
        demoted = members[:, None, :] & (qp >= self.demoted_from()[:, None, :])  # [b, t, T]
        key_4bit = left & members[:, None, :] & (ready[:, None, :] <= qp) & ~demoted
        return [(key_4bit, k4, left & ~demoted, v4), (demoted, k2, demoted, v2)]

    def demoted_from(self):
        """Band policies: the step from which each token is read at 2 bits, int32 [b, T]: its
        group g is demoted when the first token of group g + n4/G leaves the window."""
        spec, g = self.spec, self.spec.group_size
        members = self.widths == 4
        rank = jnp.cumsum(members, axis=1) - 1
        first_of_next = (rank // g + self.band_slots // g) * g  # rank of the token that starts it
        return spec.sinks + first_of_next + spec.window  # left tokens are ranked in position order

    def widths_at(self, query: int):
        """Widths [b, T] of the tokens as the query at position `query` reads them."""
        if not self.spec.band:
            return self.widths
        return jnp.where((self.widths == 4) & (query >= self.demoted_from()), 2, self.widths)


def _roundtrip(spec: PolicySpec, keys, values, members, bits):
    """Quantize-dequantize every token as a `bits` member: keys, values [b, k, T, h], members [b, T].

    Returns (keys, values, ready [b, T]): ready is the step from which a member's key is read
    quantized (its group's last member left the window); a large number if never.
    """
    dtype = keys.dtype
    b, _, T, _ = keys.shape
    never = jnp.iinfo(jnp.int32).max
    if spec.symmetric:
        kq = codecs.decode_sym(*codecs.encode_sym(keys, bits, dtype), bits, dtype)
        vq = codecs.decode_sym(*codecs.encode_sym(values, bits, dtype), bits, dtype)
        return kq, vq, jnp.zeros((b, T), jnp.int32)
    g = spec.group_size
    vq = codecs.decode_values(*codecs.encode_values(values, bits, g, dtype), bits, g, dtype)
    rank = jnp.cumsum(members, axis=1) - 1  # [b, T]
    order = jnp.argsort(jnp.where(members, rank, T + jnp.arange(T)), axis=1)  # members first, in order
    padded = -(-T // g) * g
    order = jnp.concatenate([order, jnp.zeros((b, padded - T), order.dtype)], axis=1)
    k_sorted = jnp.take_along_axis(keys, order[:, None, :, None], axis=2)  # [b, k, T', h]
    k_deq = codecs.decode_key_groups(*codecs.encode_key_groups(k_sorted, bits, g, dtype), bits, g, dtype)
    member_rank = jnp.where(members, rank, 0)
    kq = jnp.take_along_axis(k_deq, member_rank[:, None, :, None], axis=2)  # back to token order
    count = jnp.sum(members, axis=1, keepdims=True)
    last_rank = member_rank // g * g + g - 1
    last_pos = jnp.take_along_axis(order, jnp.minimum(last_rank, padded - 1), axis=1)
    ready = jnp.where(members & (last_rank < count), last_pos + spec.window, never)
    return kq, vq, ready


def assign_widths(spec: PolicySpec, caps, positions, features, counts):
    """Resolves widths token by token in position order, as tokens leave the window.

    positions [b, t], features [b, t, F], counts [b, n] -> (widths [b, t], counts).
    """
    caps = jnp.asarray(caps, jnp.int32)

    def step(counts, xs):
        pos, feat = xs
        can_leave = pos >= spec.sinks
        width = resolve_widths(spec, preferred_widths(spec, pos, feat), counts, caps)
        width = jnp.where(can_leave, width, UNDECIDED)
        return counts + tier_onehot(spec, width).astype(jnp.int32), width

    counts, widths = jax.lax.scan(step, counts, (positions.T, features.transpose(1, 0, 2)))
    return widths.T, counts


def score(params, cfg: ModelConfig, tokens, positions, spec: PolicySpec, capacity: int, dtype=jnp.float32):
    """Teacher-forced logits [b, T, v] of `tokens` under `spec`, and the final TeacherForcedCache.

    positions [b, T] run 0.. per row, -1 on right padding; `capacity` sizes the tiers as in
    `make_cache` (the same value gives the same overflow behaviour as decoding).
    """
    logits, cache, _ = _score(params, tokens, positions, cfg=cfg, spec=spec, capacity=capacity, dtype=dtype)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "capacity", "dtype"))
def _score(params, tokens, positions, *, cfg, spec, capacity, dtype):
    b, T = tokens.shape
    slots = spec.capacities(capacity)
    caps = tuple(slots[w] for w in spec.tier_widths)
    counts = jnp.zeros((b, len(spec.tier_widths)), jnp.int32)
    cache = TeacherForcedCache.init(spec, cfg, b, T, dtype, slots[4] if spec.band else 0)
    if not spec.uses_features:  # widths known from positions alone: one parallel pass
        no_features = jnp.zeros((b, T, NUM_FEATURES), jnp.float32)
        widths, _ = assign_widths(spec, caps, positions, no_features, counts)
        logits, cache = forward(params, cfg, tokens, positions, cache.replace(widths=widths), dtype)
        return logits, cache, no_features  # nothing reads features under this policy

    W = spec.window
    blocks = -(-T // W)
    pad = blocks * W - T
    tokens_p = jnp.pad(tokens, ((0, 0), (0, pad)))
    positions_p = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    cache = TeacherForcedCache.init(spec, cfg, b, blocks * W, dtype)

    def block(m, carry):
        cache, counts, logits, feats = carry
        tok = jax.lax.dynamic_slice_in_dim(tokens_p, m * W, W, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions_p, m * W, W, axis=1)
        block_logits, cache, stats = forward_with_stats(params, cfg, tok, pos, cache, dtype)
        block_feats = token_features(block_logits, tok, pos, stats)
        widths, counts = assign_widths(spec, caps, pos, block_feats, counts)
        cache = cache.replace(widths=jax.lax.dynamic_update_slice_in_dim(cache.widths, widths, m * W, axis=1))
        logits = jax.lax.dynamic_update_slice_in_dim(logits, block_logits, m * W, axis=1)
        feats = jax.lax.dynamic_update_slice_in_dim(feats, block_feats, m * W, axis=1)
        return cache, counts, logits, feats

    init = (cache, counts, jnp.zeros((b, blocks * W, cfg.vocab_size), jnp.float32),
            jnp.zeros((b, blocks * W, NUM_FEATURES), jnp.float32))
    cache, _, logits, feats = jax.lax.fori_loop(0, blocks, block, init)
    cache = cache.replace(k=cache.k[:, :, :, :T], v=cache.v[:, :, :, :T], widths=cache.widths[:, :T])
    return logits[:, :T], cache, feats[:, :T]


def prefill(params, cfg: ModelConfig, tokens, positions, empty: TieredCache):
    """Scores the prompts and builds the cache that step-by-step decoding would hold.

    tokens/positions [b, T] (right padding: position -1); returns (logits [b, T, v], cache).
    """
    logits, tf, feats = _score(params, tokens, positions, cfg=cfg, spec=empty.spec,
                               capacity=empty.capacity, dtype=empty.window.k.dtype)
    return logits, TieredCache.from_sequence(empty, tf.k, tf.v, tf.widths, feats, positions)
