"""Exact teacher-forced scoring through a cache policy.

`score` runs a whole sequence in parallel while every query attends to each earlier token in
exactly the state the step-by-step cache (kvjax.tiered) would hold it in at that step:

  token j, seen from query p        state
  j < S (sink), or p - j < W        16 bits (window)
  otherwise, j has left the window  evicted, or in the tier of its chain it has reached by step p
                                    (kvjax.history): values as that tier stores them; keys too,
                                    once j's group of G is complete (KIVI), else still 16 bits

A tier's stored form of a token is a round trip through its codec (kvjax.stores), applied down
the chain: a token demoted from a 4-bit ring to a 2-bit tier is read as 2-bit codes of its 4-bit
codes, as the step-by-step cache re-encodes it. Widths are per layer (static per segment).

Widths come from the policy. A policy that reads model outputs (features) decides a token's
tier from its own step, and that decision matters only W steps later, so such policies are scored
block by block, W queries at a time; the others in one pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import MASK_VALUE, causal_mask, grouped_output, grouped_scores
from kvjax.cache import DenseCache, KVCache, storage_dtype, write_by_position
from kvjax.config import ModelConfig
from kvjax.features import NUM_FEATURES, token_features
from kvjax.history import History, entries
from kvjax.layout import NO_ENTRY, Layout
from kvjax.model import head, hidden_states, target_logprobs
from kvjax.stores import KiviKeys, same_codes, store_class


@struct.dataclass
class TeacherForcedCache(KVCache):
    """All tokens' 16-bit K/V plus where each was stored; attention applies each query's exact state."""

    k: jax.Array  # [l, b, k, T, h]
    v: jax.Array  # [l, b, k, T, h]
    tier: jax.Array  # int32 [b, T]: the tier each token entered (NO_ENTRY until decided)
    rank: jax.Array  # int32 [b, T]
    lengths: jax.Array  # int32 [b]
    history: History | None  # derived from tier and rank by `begin`
    layout: Layout = struct.field(pytree_node=False)

    @classmethod
    def init(cls, layout: Layout, cfg: ModelConfig, batch: int, length: int, dtype):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        undecided = jnp.full((batch, length), NO_ENTRY, jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), undecided, jnp.zeros_like(undecided),
                   jnp.zeros((batch,), jnp.int32), None, layout)

    @property
    def segments(self):
        return self.layout.segments

    @property
    def rotation(self):
        return self.layout.rotation

    def begin(self, positions):
        return self.replace(history=History.of(self.layout, self.tier, self.rank))


    def advance(self, positions):
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1), history=None)

    def attend(self, layer, q, k, v, positions):
        """Stores k, v [b, t, k, h] at their positions, then attends q [b, t, n, h] over all tokens, each
        in its state at that query's step."""
        all_k, all_v = write_by_position(self.k, self.v, layer.index, k, v, positions)
        cache = self.replace(k=all_k, v=all_v)
        return cache._attend(layer, q, positions), cache

    def _attend(self, layer, q, positions):
        keys, values = self.k[layer.index], self.v[layer.index]  # [b, k, T, h]
        b, _, T, _ = keys.shape
        hist, qp = self.history, positions[:, :, None]  # qp [b, t, 1]
        j = jnp.arange(T)
        left = self.layout.has_left(j, qp)  # [b, t, T]
        visible = causal_mask(positions, jnp.broadcast_to(j, (b, T))) & ~(left & hist.evicted()[:, None, :])
        scores = grouped_scores(q, keys)
        parts = self._parts(layer.segment, keys, values, qp)
        for key_mask, kq, _, _ in parts:
            scores = jnp.where(key_mask[:, None, None], grouped_scores(q, kq), scores)
        probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, MASK_VALUE), axis=-1)
        out, full = 0.0, 1.0
        for _, _, value_mask, vq in parts:
            mask = value_mask[:, None, None].astype(probs.dtype)
            out, full = out + grouped_output(probs * mask, vq, jnp.float32), full - mask
        out = out + grouped_output(probs * full, values, jnp.float32)
        return out.astype(q.dtype)

    def _parts(self, segment: int, keys, values, qp):
        """Per depth of the chains: (key mask [b, t, T], keys, value mask, values) where queries read a
        token's stored form instead of its 16-bit K/V."""
        hist, parts = self.history, []
        forms = stored_forms(self.layout, segment, keys, values, hist)
        for d, (kq, vq) in enumerate(forms):
            if all(self.layout.segment_bits(segment, t) == (16, 16) for _, t, _ in hist.members(d)):
                continue  # every tier at this depth keeps this segment's K/V as they are
            here = hist.at_depth(d, qp)  # [b, t, T]
            key_read, key_waits, value_read = (jnp.zeros(hist.tier.shape, bool) for _ in range(3))
            for _, t, member in hist.members(d):
                kbits, vbits = self.layout.segment_bits(segment, t)
                key_read |= member & (kbits < 16)
                value_read |= member & (vbits < 16)
                if self.layout.keeps_key_stage(t, kbits):
                    key_waits |= member
            ready = ~key_waits[:, None, :] | (hist.key_ready[:, None, :] <= qp)
            parts.append((here & key_read[:, None, :] & ready, kq, here & value_read[:, None, :], vq))
        return parts

    def bits_at(self, query):
        """float32 [b, T]: average bits (over layers, keys and values) each token is stored at, as the
        query at position `query` reads it: 16 in the window or a sink, 0 if evicted."""
        hist = History.of(self.layout, self.tier, self.rank)
        where = hist.tier_at(query)
        bits = jnp.where(hist.evicted() & self.layout.has_left(jnp.arange(self.tier.shape[1]), query), 0.0, 16.0)
        for i, t in enumerate(self.layout.tiers):
            bits = jnp.where(where == i, t.mean_bits(), bits)
        return bits


def stored_forms(layout: Layout, segment: int, keys, values, hist: History):
    """[(keys, values)] per depth d: every token as the tier at depth d of its chain gives it back.

    keys, values [..., b, k, T, h] in the cache's 16-bit dtype (the segment's layers may lead); a
    tier's input is the form of the depth before (the 16-bit K/V at depth 0), so demoted tokens are
    re-encoded from their codes. The forms are float32, as the step-by-step cache reads them.
    """
    g, dtype = layout.group_size, keys.dtype  # scales and zeros are stored in the 16-bit dtype
    keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
    forms = []
    for d in range(hist.depth):
        kq, vq = keys, values
        for h, t, member in hist.members(d):
            tier, (kbits, vbits) = layout.tiers[t], layout.segment_bits(segment, t)
            k_in, v_in = (keys, values) if d == 0 else forms[d - 1]
            before = layout.tiers[layout.chain(h)[d - 1]] if d else None
            vstore = store_class(vbits, tier.symmetric, False)
            here = member[:, None, :, None]  # [b, 1, T, 1]
            if before is None or not _copied(layout, segment, layout.chain(h)[d - 1], t, True):
                k_in = _keys_form(k_in, kbits, tier, hist, h, g, dtype)
            if before is None or not _copied(layout, segment, layout.chain(h)[d - 1], t, False):
                v_in = vstore.roundtrip(v_in, vbits, g, dtype)
            kq, vq = jnp.where(here, k_in, kq), jnp.where(here, v_in, vq)
        forms.append((kq, vq))
    return forms


def _copied(layout: Layout, segment: int, src: int, dst: int, keys: bool) -> bool:
    """Whether a demotion from tier src to dst copies the codes of one side (same store, same width)."""
    a, b = layout.tiers[src], layout.tiers[dst]
    bits_a, bits_b = (layout.segment_bits(segment, i)[0 if keys else 1] for i in (src, dst))
    return same_codes(store_class(bits_a, a.symmetric, keys), store_class(bits_b, b.symmetric, keys), bits_a, bits_b)


def _keys_form(x, bits, tier, hist: History, head: int, g: int, dtype):
    """Keys of the tokens of `head`'s chain as a tier at `bits` stores them: x [..., b, k, T, h]."""
    store = store_class(bits, tier.symmetric, keys=True)
    if store is not KiviKeys:
        return store.roundtrip(x, bits, g, dtype)
    deq = store.roundtrip(_gather_tokens(x, hist.order[:, head]), bits, g, dtype)  # groups in rank order
    return _gather_tokens(deq, jnp.where(hist.tier == head, hist.rank, 0))  # back in token order


def _gather_tokens(x, index):
    """x [..., b, k, T, h] at token index [b, T'] -> [..., b, k, T', h]."""
    b, t = index.shape
    return jnp.take_along_axis(x, index.reshape((1,) * (x.ndim - 4) + (b, 1, t, 1)), axis=-2)


def score(params, cfg: ModelConfig, tokens, positions, policy, capacity: int, dtype=jnp.float32, kv_dtype=None):
    """Teacher-forced logits [b, T, v] of `tokens` under `policy`, and the final scoring cache (for fp16
    a DenseCache: its K/V are stored in 16 bits as decoding stores them).

    positions [b, T] run 0.. per row, -1 on right padding; `capacity` sizes the tiers as in
    `make_cache` (the same value gives the same overflow behaviour as decoding); K/V are stored as
    the cache stores them (`kv_dtype`, default kvjax.cache.storage_dtype of `dtype`). Scoring a long
    text: `score_targets`, which never holds the [b, T, v] logits.
    """
    logits, cache, _ = score_with_features(params, cfg, tokens, positions, policy, capacity, dtype, kv_dtype)
    return logits, cache


def score_targets(params, cfg: ModelConfig, tokens, positions, targets, policy, capacity: int, dtype=jnp.float32,
                  kv_dtype=None):
    """`score` as log p(targets [b, T] | tokens up to each) -> (float32 [b, T], bool [b, T]: each target
    the most likely token, cache): the output head runs a block of positions at a time
    (kvjax.model.target_logprobs)."""
    hidden, cache, _ = score_hidden(params, cfg, tokens, positions, policy, capacity, dtype, kv_dtype)
    return *target_logprobs(params, cfg, hidden, targets, dtype), cache


def score_with_features(params, cfg, tokens, positions, policy, capacity, dtype=jnp.float32, kv_dtype=None):
    """`score`, and the token features [b, T, F] the policy read (zeros for a policy that reads none)."""
    hidden, cache, features = score_hidden(params, cfg, tokens, positions, policy, capacity, dtype, kv_dtype)
    return head(params, cfg, hidden, dtype), cache, features


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "capacity", "dtype", "kv_dtype"))
def score_hidden(params, cfg, tokens, positions, policy, capacity, dtype=jnp.float32, kv_dtype=None):
    """The final hidden states [b, T, d] of teacher-forced scoring, the scoring cache, and the token
    features [b, T, F] the policy read (zeros for a policy that reads none)."""
    b, T = tokens.shape
    no_features = jnp.zeros((b, T, NUM_FEATURES), jnp.float32)
    layout = policy.layout(cfg, capacity)
    store = storage_dtype(dtype, kv_dtype)
    if layout is None:  # fp16: every token in 16 bits, in its own cache
        hidden, cache, _ = hidden_states(params, cfg, tokens, positions, DenseCache.init(cfg, b, T, store), dtype)
        return hidden, cache, no_features
    cache = TeacherForcedCache.init(layout, cfg, b, T, store)
    entered = jnp.zeros((b, len(layout.tiers)), jnp.int32)
    if not policy.uses_features:  # tiers known from positions alone: one parallel pass
        tier, rank, _ = entries(policy, layout, positions, no_features, entered)
        hidden, cache, _ = hidden_states(params, cfg, tokens, positions, cache.replace(tier=tier, rank=rank), dtype)
        return hidden, cache, no_features

    W = layout.window
    blocks = -(-T // W)
    pad = blocks * W - T
    tokens_p = jnp.pad(tokens, ((0, 0), (0, pad)))
    positions_p = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    cache = TeacherForcedCache.init(layout, cfg, b, blocks * W, store)

    def block(m, carry):
        cache, entered, hidden, feats = carry
        tok = jax.lax.dynamic_slice_in_dim(tokens_p, m * W, W, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions_p, m * W, W, axis=1)
        block_hidden, cache, stats = hidden_states(params, cfg, tok, pos, cache, dtype, token_stats=True)
        block_feats = token_features(head(params, cfg, block_hidden, dtype), tok, pos, stats)
        tier, rank, entered = entries(policy, layout, pos, block_feats, entered)
        put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, m * W, axis=1)
        cache = cache.replace(tier=put(cache.tier, tier), rank=put(cache.rank, rank))
        return cache, entered, put(hidden, block_hidden), put(feats, block_feats)

    init = (cache, entered, jnp.zeros((b, blocks * W, cfg.hidden_size), dtype),
            jnp.zeros((b, blocks * W, NUM_FEATURES), jnp.float32))
    cache, _, hidden, feats = jax.lax.fori_loop(0, blocks, block, init)
    cache = cache.replace(k=cache.k[:, :, :, :T], v=cache.v[:, :, :, :T], tier=cache.tier[:, :T],
                          rank=cache.rank[:, :T])
    return hidden[:, :T], cache, feats[:, :T]
