"""The quantized KV cache for step-by-step decoding: one pytree of per-precision tiers.

  sink     DenseTier [l, b, k, S, h]   the first S tokens, kept in 16 bits
  window   DenseTier [l, b, k, W, h]   ring buffer of the W newest tokens (slot = position % W)
  kept     DenseTier [l, b, k, C16, h] tokens a mixed policy keeps at 16 bits
  packed   one PackedTier per width in {2, 4, 8}: bit-packed codes + scales (kvjax.codecs)

Every tier is allocated at the size its bits call for; `nbytes` counts them exactly. When
token p arrives (one token per sequence per step), token p - W leaves the window: the
policy picks its width (kvjax.policies) and it is appended to that tier, or dropped by an
eviction policy. KIVI keys are staged in 16 bits until their width's group of G tokens is
full, then quantized per channel; values are quantized at once, per token.

A band policy's 4-bit tier is a ring of whole groups: when the first token of a new group
arrives and the ring is full, the oldest group is decoded, re-encoded at 2 bits into the 2-bit
tier (which fills in order) and its slots are freed for the new group.

Prompts enter through `from_sequence`, which builds the state that step-by-step decoding
would have reached (kvjax.teacher_forced computes the prompt's K/V and widths).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import codecs
from kvjax.attention import causal_mask, masked_attention
from kvjax.config import ModelConfig
from kvjax.errors import KvjaxError
from kvjax.features import NUM_FEATURES
from kvjax.policies import PolicySpec, preferred_widths, resolve_widths, tier_onehot
# Module imports: pallas_kernels imports kvjax back.
import pallas_kernels.decode_attention as fused
import pallas_kernels.quantize_pack as quantize_pack

KERNEL_MODES = ("auto", "reference", "kernel", "interpret")


class Encoders(NamedTuple):
    """The three row encoders of kvjax.codecs, from the codecs or from the Pallas kernels."""

    values: Callable
    key_groups: Callable
    sym: Callable


def encoders(mode: str) -> Encoders:
    """Encoders for a resolved kernels mode: the codecs ("reference") or the Pallas quantize + pack
    kernels ("kernel"; "interpret": run by the Pallas interpreter). Bit-identical outputs."""
    if mode == "reference":
        return Encoders(codecs.encode_values, codecs.encode_key_groups, codecs.encode_sym)
    kw = dict(interpret=mode == "interpret")
    return Encoders(functools.partial(quantize_pack.encode_values, **kw),
                    functools.partial(quantize_pack.encode_key_groups, **kw),
                    functools.partial(quantize_pack.encode_sym, **kw))


@struct.dataclass
class DenseTier:
    k: jax.Array  # [l, b, k, c, h]
    v: jax.Array  # [l, b, k, c, h]
    pos: jax.Array  # int32 [b, c]: position held by each slot, -1 = empty

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32))

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def write(self, layer, rows, slot, k, v):
        """k, v [b, k, h] into `slot` [b] of `layer` (slot out of range = no write)."""
        at = (rows, slice(None), slot)
        return self.replace(k=_put(self.k, layer, at, k), v=_put(self.v, layer, at, v))

    def read(self, layer):
        return self.k[layer], self.v[layer]


def _put(array, layer, index, values):
    """array[layer][index] = values (out-of-range indices dropped).

    Scattering into the one layer's slice and writing that slice back lets XLA update the
    cache in place; a scatter into the whole [l, ...] array copied it on every step.
    """
    return array.at[layer].set(array[layer].at[index].set(values, mode="drop"))


@struct.dataclass
class PackedTier:
    """Tokens of one width. Asymmetric (KIVI) or symmetric per-token codes, see kvjax.codecs."""

    k_codes: jax.Array  # uint32 [l, b, k, c, h * bits / 32]
    k_scale: jax.Array  # [l, b, k, c / G, h] (KIVI) | [l, b, k, c, 1] (symmetric)
    k_zero: jax.Array | None  # [l, b, k, c / G, h] (KIVI) | None
    k_stage: jax.Array | None  # [l, b, k, G, h]: 16-bit keys of the group being filled (KIVI)
    v_codes: jax.Array  # uint32 [l, b, k, c, h * bits / 32]
    v_scale: jax.Array  # [l, b, k, c, h / G] | [l, b, k, c, 1]
    v_zero: jax.Array | None  # [l, b, k, c, h / G] | None
    pos: jax.Array  # int32 [b, c]
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)

    @property
    def symmetric(self) -> bool:
        return self.k_zero is None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int, bits: int, group_size: int, symmetric: bool, dtype):
        l, k, h, g = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, group_size
        words = lambda: jnp.zeros((l, batch, k, slots, h * bits // 32), jnp.uint32)
        pos = jnp.full((batch, slots), -1, jnp.int32)
        if symmetric:
            scale = lambda: jnp.zeros((l, batch, k, slots, 1), dtype)
            return cls(words(), scale(), None, None, words(), scale(), None, pos, bits, g)
        key_scale = lambda: jnp.zeros((l, batch, k, slots // g, h), dtype)
        value_scale = lambda: jnp.zeros((l, batch, k, slots, h // g), dtype)
        return cls(words(), key_scale(), key_scale(), jnp.zeros((l, batch, k, g, h), dtype), words(),
                   value_scale(), value_scale(), pos, bits, g)

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def append(self, layer, rows, slot, k, v, enc: Encoders):
        """Stores one token per row, k, v [b, k, h], at `slot` [b] (out of range = none)."""
        dtype, at = k.dtype, (rows, slice(None), slot)
        if self.symmetric:
            kc, ks = enc.sym(k[:, :, None], self.bits, dtype)
            vc, vs = enc.sym(v[:, :, None], self.bits, dtype)
            return self.replace(k_codes=_put(self.k_codes, layer, at, kc[:, :, 0]),
                                k_scale=_put(self.k_scale, layer, at, ks[:, :, 0]),
                                v_codes=_put(self.v_codes, layer, at, vc[:, :, 0]),
                                v_scale=_put(self.v_scale, layer, at, vs[:, :, 0]))
        g = self.group_size
        vc, vs, vz = enc.values(v[:, :, None], self.bits, g, dtype)
        stage_slot = jnp.where(slot < self.slots, slot % g, g)
        stage = _put(self.k_stage, layer, (rows, slice(None), stage_slot), k)
        # A group of G staged keys is complete: quantize it per channel into its G slots.
        complete = (slot < self.slots) & (slot % g == g - 1)
        kc, ks, kz = enc.key_groups(stage[layer], self.bits, g, dtype)  # [b, k, G, w], [b, k, 1, h]
        group = (rows, slice(None), jnp.where(complete, slot // g, self.slots // g))
        group_slots = jnp.where(complete[:, None], (slot // g)[:, None] * g + jnp.arange(g), self.slots)
        return self.replace(
            k_codes=_put(self.k_codes, layer, (rows[:, None], slice(None), group_slots), kc.transpose(0, 2, 1, 3)),
            k_scale=_put(self.k_scale, layer, group, ks[:, :, 0]),
            k_zero=_put(self.k_zero, layer, group, kz[:, :, 0]),
            k_stage=stage,
            v_codes=_put(self.v_codes, layer, at, vc[:, :, 0]),
            v_scale=_put(self.v_scale, layer, at, vs[:, :, 0]),
            v_zero=_put(self.v_zero, layer, at, vz[:, :, 0]))

    def partials(self, layer, q, count, interpret: bool):
        """Flash-decoding partials of q [b, n, h] over this tier's first count [b] tokens.

        The fused kernel over the packed codes; KIVI adds a 16-bit part for the keys of the
        group being filled (the stage) with their quantized values.
        """
        g, (b, k) = self.group_size, self.k_codes.shape[1:3]
        if self.symmetric:
            return [fused.tier_attention_partials(
                q, self.k_codes[layer], self.k_scale[layer], None, self.v_codes[layer], self.v_scale[layer], None,
                count, bits=self.bits, group_size=g, blocks=fused.auto_blocks(b, k, self.slots),
                interpret=interpret)]
        full = count // g * g  # slots whose key group is quantized
        packed = fused.tier_attention_partials(
            q, self.k_codes[layer], self.k_scale[layer], self.k_zero[layer], self.v_codes[layer],
            self.v_scale[layer], self.v_zero[layer], full, bits=self.bits, group_size=g,
            blocks=fused.auto_blocks(b, k, self.slots), interpret=interpret)
        rows = jnp.arange(b)[:, None]
        slot = jnp.minimum(full[:, None] + jnp.arange(g), self.slots - 1)  # [b, G]
        take = lambda x: x[layer][rows, :, slot].transpose(0, 2, 1, 3)  # [b, G, k, .] -> [b, k, G, .]
        values = codecs.decode_values(take(self.v_codes), take(self.v_scale), take(self.v_zero), self.bits, g,
                                      q.dtype)
        staged = fused.dense_partials(q, self.k_stage[layer], values, jnp.arange(g)[None, :] < (count - full)[:, None])
        return [packed, staged]

    def read(self, layer, count, dtype):
        """Dequantized keys, values [b, k, c, h]; keys of an unfinished group come from the stage.

        count [b]: tokens that entered the tier (a band's ring: ever, so its slot wraps around)."""
        if self.symmetric:
            return (codecs.decode_sym(self.k_codes[layer], self.k_scale[layer], self.bits, dtype),
                    codecs.decode_sym(self.v_codes[layer], self.v_scale[layer], self.bits, dtype))
        g = self.group_size
        keys = codecs.decode_key_groups(self.k_codes[layer], self.k_scale[layer], self.k_zero[layer],
                                        self.bits, g, dtype)
        start = count // g * g % max(self.slots, 1)  # the group being filled (a band's ring wraps around)
        slot = jnp.arange(self.slots)
        staged = (slot >= start[:, None]) & (slot < (start + count % g)[:, None])  # [b, c]
        stage = jnp.tile(self.k_stage[layer], (1, 1, self.slots // g, 1))  # [b, k, c, h]
        keys = jnp.where(staged[:, None, :, None], stage, keys)
        values = codecs.decode_values(self.v_codes[layer], self.v_scale[layer], self.v_zero[layer],
                                      self.bits, g, dtype)
        return keys, values

    def read_group(self, layer, start, dtype):
        """Dequantized keys, values [b, k, G, h] of the complete KIVI group at slots start.. (start [b])."""
        g, b = self.group_size, start.shape[0]
        rows = jnp.arange(b)[:, None]
        slots = jnp.minimum(start[:, None] + jnp.arange(g), self.slots - 1)  # [b, G]
        take = lambda x: x[layer][rows, :, slots].transpose(0, 2, 1, 3)  # [b, G, k, .] -> [b, k, G, .]
        group = jnp.minimum(start // g, self.slots // g - 1)
        scale_of = lambda x: x[layer][jnp.arange(b), :, group][:, :, None]  # [b, k, 1, h]
        keys = codecs.decode_key_groups(take(self.k_codes), scale_of(self.k_scale), scale_of(self.k_zero),
                                        self.bits, g, dtype)
        values = codecs.decode_values(take(self.v_codes), take(self.v_scale), take(self.v_zero), self.bits, g, dtype)
        return keys, values

    def write_group(self, layer, rows, start, k, v, enc: Encoders):
        """Stores a complete KIVI group k, v [b, k, G, h] at slots start.. (start [b]; out of range = none)."""
        g, dtype = self.group_size, k.dtype
        kc, ks, kz = enc.key_groups(k, self.bits, g, dtype)  # [b, k, G, w], [b, k, 1, h]
        vc, vs, vz = enc.values(v, self.bits, g, dtype)  # [b, k, G, w], [b, k, G, h/G]
        inside = start < self.slots
        slots = (rows[:, None], slice(None), jnp.where(inside[:, None], start[:, None] + jnp.arange(g), self.slots))
        group = (rows, slice(None), jnp.where(inside, start // g, self.slots // g))
        by_slot = lambda x: x.transpose(0, 2, 1, 3)  # [b, k, G, .] -> [b, G, k, .]
        return self.replace(k_codes=_put(self.k_codes, layer, slots, by_slot(kc)),
                            k_scale=_put(self.k_scale, layer, group, ks[:, :, 0]),
                            k_zero=_put(self.k_zero, layer, group, kz[:, :, 0]),
                            v_codes=_put(self.v_codes, layer, slots, by_slot(vc)),
                            v_scale=_put(self.v_scale, layer, slots, by_slot(vs)),
                            v_zero=_put(self.v_zero, layer, slots, by_slot(vz)))


@struct.dataclass
class Route:
    """Where this step's tokens go (the same for every layer), set by `TieredCache.begin`."""

    new_pos: jax.Array  # int32 [b]: the arriving token's position (-1 = padding)
    leave_pos: jax.Array  # int32 [b]: the token leaving the window (-1 = none)
    leave_width: jax.Array  # int32 [b]: its width (0 = evicted)
    leave_slot: jax.Array  # int32 [b]: its slot in the tier of that width
    demote: jax.Array | None = None  # bool [b], band: the ring group at leave_slot.. moves to 2 bits
    demote_to: jax.Array | None = None  # int32 [b]: its first slot in the 2-bit tier


@struct.dataclass
class TieredCache:
    sink: DenseTier
    window: DenseTier
    kept: DenseTier
    packed: tuple[PackedTier, ...]
    counts: jax.Array  # int32 [b, len(spec.tier_widths)]: tokens per tier
    window_features: jax.Array  # float32 [b, W, F]: features of the window's tokens
    lengths: jax.Array  # int32 [b]
    route: Route | None
    spec: PolicySpec = struct.field(pytree_node=False)
    caps: tuple[int, ...] = struct.field(pytree_node=False)  # slots per tier, as tier_widths
    capacity: int = struct.field(pytree_node=False)  # tokens per sequence the cache was sized for
    kernels: str = struct.field(pytree_node=False, default="auto")  # one of KERNEL_MODES, see `kernel_mode`

    @classmethod
    def init(cls, spec: PolicySpec, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32):
        spec.check(cfg)
        caps = spec.capacities(capacity)
        dense = lambda slots: DenseTier.init(cfg, batch, slots, dtype)
        packed = tuple(PackedTier.init(cfg, batch, caps[w], w, spec.group_size, spec.symmetric, dtype)
                       for w in spec.quant_widths)
        return cls(sink=dense(spec.sinks), window=dense(spec.window), kept=dense(caps.get(16, 0)),
                   packed=packed, counts=jnp.zeros((batch, len(spec.tier_widths)), jnp.int32),
                   window_features=jnp.zeros((batch, spec.window, NUM_FEATURES), jnp.float32),
                   lengths=jnp.zeros((batch,), jnp.int32), route=None, spec=spec,
                   caps=tuple(caps[w] for w in spec.tier_widths), capacity=capacity)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    @property
    def uses_features(self) -> bool:
        return self.spec.uses_features

    def tokens_per_tier(self) -> dict[str, jax.Array]:
        """Tokens held per tier and sequence (int32 [b] each); evicted tokens are in none."""
        valid = lambda pos: jnp.sum(pos >= 0, axis=1)
        out = {"sink": valid(self.sink.pos), "window": valid(self.window.pos)}
        out.update({f"{w}-bit": self.counts[:, i] for i, w in enumerate(self.spec.tier_widths)})
        if self.spec.band:  # the ring's count is of every token that entered it, demoted ones too
            out["4-bit"] = out["4-bit"] - out["2-bit"]
        return out

    def kernel_mode(self) -> str:
        """How the cache quantizes and attends: "reference" (kvjax.codecs + jnp attention over
        every tier dequantized) or "kernel" (the Pallas quantize + pack and fused decode attention
        kernels); "interpret" runs those kernels in the Pallas interpreter (tests on CPU). "auto":
        the kernels on GPU, the reference on CPU and TPU (the TPU kernels have only run in the
        TPU interpreter; ask for "kernel" to compile them)."""
        if self.kernels not in KERNEL_MODES:
            raise KvjaxError(f"unknown kernels mode {self.kernels!r}; known: {', '.join(KERNEL_MODES)}")
        if self.kernels == "auto":
            return "kernel" if jax.default_backend() == "gpu" and not self.spec.band else "reference"
        if self.spec.band and self.kernels != "reference":
            raise KvjaxError(f"{self.spec.name}: band policies run on the reference path only "
                             "(the fused kernel reads tiers filled in order, not a ring)")
        return self.kernels

    # -- the three steps the model calls ------------------------------------------------

    def begin(self, positions):
        """Routes this step's tokens: positions int32 [b, 1]."""
        if positions.shape[1] != 1:
            raise KvjaxError("a quantized cache takes one token per sequence per step; "
                             "prompts go through kvjax.teacher_forced.prefill")
        spec, p = self.spec, positions[:, 0]
        rows = jnp.arange(p.shape[0])
        leave_pos = jnp.where((p >= 0) & (p - spec.window >= spec.sinks), p - spec.window, -1)
        leaving = leave_pos >= 0
        ring = jnp.where(p >= spec.sinks, p % spec.window, spec.window)
        feats = self.window_features[rows, jnp.minimum(ring, spec.window - 1)]
        width = resolve_widths(spec, preferred_widths(spec, leave_pos, feats), self.counts, self.caps)
        width = jnp.where(leaving, width, -1)
        onehot = tier_onehot(spec, width)
        slot = jnp.sum(jnp.where(onehot, self.counts, 0), axis=1)
        counts = self.counts + onehot.astype(jnp.int32)
        sink_slot = jnp.where((p >= 0) & (p < spec.sinks), p, spec.sinks)
        cache = self.replace(
            sink=self.sink.replace(pos=self.sink.pos.at[rows, sink_slot].set(p, mode="drop")),
            window=self.window.replace(pos=self.window.pos.at[rows, ring].set(p, mode="drop")),
            counts=counts, route=Route(p, leave_pos, width, slot))
        if spec.band:
            cache = cache._route_band(rows, leaving)
        return cache._set_tier_positions(rows, width, cache.route.leave_slot, leave_pos)

    def _route_band(self, rows, leaving):
        """Band policies: the leaving token's slot in the 4-bit ring and, when it starts a group
        and the ring is full, the demotion of the ring's oldest group (positions and counts)."""
        g, r = self.spec.group_size, self.route
        low, ring = self.packed  # a band policy's tiers: 2 and 4 bits
        entered = r.leave_slot  # tokens that entered the ring before this one
        slot = entered % ring.slots
        demote = leaving & (entered % g == 0) & (entered >= ring.slots)
        i2 = self.spec.tier_widths.index(2)
        demote_to = self.counts[:, i2]
        group = slot[:, None] + jnp.arange(g)  # [b, G]: the oldest group's slots, where this group goes
        old_pos = ring.pos[rows[:, None], group]
        ring = ring.replace(pos=ring.pos.at[rows[:, None], jnp.where(demote[:, None], group, ring.slots)]
                            .set(-1, mode="drop"))
        to = jnp.where(demote[:, None], demote_to[:, None] + jnp.arange(g), low.slots)
        low = low.replace(pos=low.pos.at[rows[:, None], to].set(old_pos, mode="drop"))
        counts = self.counts.at[:, i2].add(jnp.where(demote, g, 0))
        return self.replace(packed=(low, ring), counts=counts,
                            route=r.replace(leave_slot=slot, demote=demote, demote_to=demote_to))

    def _set_tier_positions(self, rows, width, slot, leave_pos):
        def put(tier, w):
            idx = jnp.where(width == w, slot, tier.slots)
            return tier.replace(pos=tier.pos.at[rows, idx].set(leave_pos, mode="drop"))

        return self.replace(kept=put(self.kept, 16) if 16 in self.spec.tier_widths else self.kept,
                            packed=tuple(put(t, t.bits) for t in self.packed))

    def update(self, layer, k, v, positions):
        """Moves the leaving token of `layer` to its tier, then stores k, v [b, 1, k, h]."""
        spec, r = self.spec, self.route
        rows = jnp.arange(k.shape[0])
        ring = jnp.where(r.new_pos >= spec.sinks, r.new_pos % spec.window, spec.window)
        ring_read = jnp.minimum(ring, spec.window - 1)
        old_k, old_v = self.window.k[layer, rows, :, ring_read], self.window.v[layer, rows, :, ring_read]
        kept = self.kept
        if 16 in spec.tier_widths:
            kept = kept.write(layer, rows, jnp.where(r.leave_width == 16, r.leave_slot, kept.slots), old_k, old_v)
        enc = encoders(self.kernel_mode())
        packed = self.packed
        if spec.band:  # demote first: the leaving token's slot starts the demoted group's slots
            low, band = packed
            k_old, v_old = band.read_group(layer, r.leave_slot, self.window.k.dtype)
            low = low.write_group(layer, rows, jnp.where(r.demote, r.demote_to, low.slots), k_old, v_old, enc)
            packed = (low, band)
        packed = tuple(t.append(layer, rows, jnp.where(r.leave_width == t.bits, r.leave_slot, t.slots),
                                old_k, old_v, enc) for t in packed)
        k, v = k[:, 0].astype(self.window.k.dtype), v[:, 0].astype(self.window.v.dtype)
        sink_slot = jnp.where((r.new_pos >= 0) & (r.new_pos < spec.sinks), r.new_pos, spec.sinks)
        return self.replace(sink=self.sink.write(layer, rows, sink_slot, k, v),
                            window=self.window.write(layer, rows, ring, k, v), kept=kept, packed=packed)

    def attend(self, layer, q, positions):
        """q [b, 1, n, h] over every tier of `layer`: one softmax over their union.

        Reference (`kernel_mode`): every tier dequantized and attended at once. Kernel: the packed
        tiers are read by the fused Pallas kernel and merged with the 16-bit tiers through
        flash-decoding partials.
        """
        mode = self.kernel_mode()
        if mode != "reference":
            return self._attend_partials(layer, q, positions, interpret=mode == "interpret")
        dtype = self.window.k.dtype
        parts = [(*self.sink.read(layer), self.sink.pos), (*self.window.read(layer), self.window.pos),
                 (*self.kept.read(layer), self.kept.pos)]
        for i, tier in enumerate(self.packed):
            parts.append((*tier.read(layer, self.counts[:, i], dtype), tier.pos))
        keys = jnp.concatenate([p[0] for p in parts], axis=2)
        values = jnp.concatenate([p[1] for p in parts], axis=2)
        pos = jnp.concatenate([p[2] for p in parts], axis=1)
        return masked_attention(q, keys, values, causal_mask(positions, pos))

    def _attend_partials(self, layer, q, positions, interpret: bool):
        qs, p = q[:, 0], positions[:, 0]  # [b, n, h], [b]
        parts = []
        for tier in (self.sink, self.window, self.kept):
            if tier.slots:
                visible = (tier.pos >= 0) & (tier.pos <= p[:, None])  # [b, c]
                parts.append(fused.dense_partials(qs, *tier.read(layer), visible))
        for i, tier in enumerate(self.packed):
            if tier.slots:
                parts += tier.partials(layer, qs, self.counts[:, i], interpret)
        return fused.merge_partials(parts)[:, None].astype(q.dtype)

    def advance(self, positions):
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1), route=None)

    def record_features(self, positions, features):
        """Keeps this step's token features [b, 1, F] for when the token leaves the window."""
        spec, p = self.spec, positions[:, 0]
        ring = jnp.where(p >= spec.sinks, p % spec.window, spec.window)
        rows = jnp.arange(p.shape[0])
        return self.replace(window_features=self.window_features.at[rows, ring].set(features[:, 0], mode="drop"))

    # -- prompts ------------------------------------------------------------------------

    @classmethod
    def from_sequence(cls, empty: "TieredCache", k_all, v_all, widths, features, positions):
        """The state after step-by-step decoding of a whole sequence.

        k_all, v_all [l, b, k, T, h] (token j at index j), widths int32 [b, T] as resolved
        by the teacher-forced path, features [b, T, F], positions [b, T] (-1 = padding).
        """
        spec = empty.spec
        b, T = positions.shape
        rows = jnp.arange(b)[:, None]
        j = jnp.arange(T)[None, :]
        n = jnp.sum(positions >= 0, axis=1, keepdims=True)  # [b, 1]
        valid = j < n
        k_tok, v_tok = k_all.transpose(1, 3, 0, 2, 4), v_all.transpose(1, 3, 0, 2, 4)  # [b, T, l, k, h]
        pos = jnp.broadcast_to(j, (b, T))

        def place(tier, slot):
            return tier.replace(k=tier.k.at[:, rows, :, slot].set(k_tok, mode="drop"),
                                v=tier.v.at[:, rows, :, slot].set(v_tok, mode="drop"),
                                pos=tier.pos.at[rows, slot].set(pos, mode="drop"))

        sink = place(empty.sink, jnp.where(valid & (j < spec.sinks), j, spec.sinks))
        in_window = valid & (j >= spec.sinks) & (j >= n - spec.window)
        ring = jnp.where(in_window, j % spec.window, spec.window)
        window = place(empty.window, ring)
        window_features = empty.window_features.at[rows, ring].set(features, mode="drop")

        left = valid & spec.has_left(j, n - 1)
        enc = encoders(empty.kernel_mode())
        if spec.band:
            counts, packed = _fill_band(empty.packed, k_all, v_all, left, pos, enc)
            return empty.replace(sink=sink, window=window, packed=packed, counts=counts,
                                 window_features=window_features, lengths=n[:, 0])
        counts, kept, packed = [], empty.kept, []
        for i, w in enumerate(spec.tier_widths):
            members = left & (widths == w)
            rank = jnp.cumsum(members, axis=1) - 1
            counts.append(jnp.sum(members, axis=1))
            if w == 16:
                kept = place(kept, jnp.where(members, rank, kept.slots))
                continue
            tier = empty.packed[spec.quant_widths.index(w)]
            stage_start = counts[-1] // tier.group_size * tier.group_size
            packed.append(_fill_packed(tier, k_all, v_all, members, rank, pos, stage_start, enc))
        return empty.replace(sink=sink, window=window, kept=kept, packed=tuple(packed),
                             counts=jnp.stack(counts, axis=1) if counts else empty.counts,
                             window_features=window_features, lengths=n[:, 0])


def _fill_packed(tier: PackedTier, k_all, v_all, members, slot, pos, stage_start, enc: Encoders) -> PackedTier:
    """Writes a sequence's member tokens into an empty packed tier.

    k_all, v_all [l, b, k, T, h]; members [b, T]; slot [b, T]: each member's slot (distinct);
    pos [b, T]: their positions; stage_start [b]: the first slot of the KIVI group being filled,
    whose keys are also kept in 16 bits (the stage).
    """
    b, T = members.shape
    rows = jnp.arange(b)[:, None]
    c, g, dtype = tier.slots, tier.group_size, k_all.dtype
    if c == 0:
        return tier
    slot = jnp.where(members, slot, c)
    at = (slice(None), rows, slice(None), slot)
    to_slots = lambda x: x.transpose(1, 3, 0, 2, 4)  # [l, b, k, T, w] -> [b, T, l, k, w]
    tier = tier.replace(pos=tier.pos.at[rows, slot].set(pos, mode="drop"))
    if tier.symmetric:
        kc, ks = enc.sym(k_all, tier.bits, dtype)
        vc, vs = enc.sym(v_all, tier.bits, dtype)
        return tier.replace(k_codes=tier.k_codes.at[at].set(to_slots(kc), mode="drop"),
                            k_scale=tier.k_scale.at[at].set(to_slots(ks), mode="drop"),
                            v_codes=tier.v_codes.at[at].set(to_slots(vc), mode="drop"),
                            v_scale=tier.v_scale.at[at].set(to_slots(vs), mode="drop"))
    vc, vs, vz = enc.values(v_all, tier.bits, g, dtype)
    # Keys: put the members in their slots, then quantize whole groups of G.
    l, _, k, _, h = k_all.shape
    k_slots = jnp.zeros((l, b, k, c, h), dtype).at[at].set(to_slots(k_all), mode="drop")  # [l, b, k, c, h]
    kc, ks, kz = enc.key_groups(k_slots, tier.bits, g, dtype)
    stage_idx = jnp.minimum(stage_start[:, None] + jnp.arange(g), c - 1)  # [b, G]
    stage = jnp.take_along_axis(k_slots, stage_idx[None, :, None, :, None], axis=3)
    return tier.replace(k_codes=kc, k_scale=ks, k_zero=kz, k_stage=stage,
                        v_codes=tier.v_codes.at[at].set(to_slots(vc), mode="drop"),
                        v_scale=tier.v_scale.at[at].set(to_slots(vs), mode="drop"),
                        v_zero=tier.v_zero.at[at].set(to_slots(vz), mode="drop"))


def _fill_band(tiers: tuple[PackedTier, PackedTier], k_all, v_all, left, pos, enc: Encoders):
    """A band policy's (2-bit, 4-bit ring) tiers after its `left` tokens [b, T] left in order:
    counts [b, 2] (as TieredCache.counts) and the two tiers."""
    low, ring = tiers
    g, c4 = ring.group_size, ring.slots
    b, T = left.shape
    rank = jnp.cumsum(left, axis=1) - 1
    n = jnp.sum(left, axis=1)  # [b]: tokens that entered the ring
    demoted = jnp.maximum(-(-n // g) - c4 // g, 0) * g  # [b]: tokens of the groups moved to 2 bits
    in_ring = left & (rank >= demoted[:, None])
    ring = _fill_packed(ring, k_all, v_all, in_ring, rank % c4, pos, n // g * g % c4, enc)
    # The demoted groups: 4-bit codes decoded, in rank order, then stored at 2 bits.
    padded = -(-T // g) * g
    by_rank = jnp.where(left, rank, padded)
    rows = jnp.arange(b)[:, None]
    lin = lambda x: jnp.zeros(x.shape[:3] + (padded,) + x.shape[4:], x.dtype).at[:, rows, :, by_rank].set(
        x.transpose(1, 3, 0, 2, 4), mode="drop")  # [l, b, k, T, h] -> [l, b, k, T', h], token j at its rank
    k_lin, v_lin = lin(k_all), lin(v_all)
    dtype = k_all.dtype
    k4 = codecs.decode_key_groups(*enc.key_groups(k_lin, 4, g, dtype), 4, g, dtype)
    v4 = codecs.decode_values(*enc.values(v_lin, 4, g, dtype), 4, g, dtype)
    ranks = jnp.broadcast_to(jnp.arange(padded), (b, padded))
    pos_lin = jnp.full((b, padded), -1, jnp.int32).at[rows, by_rank].set(pos, mode="drop")
    low = _fill_packed(low, k4, v4, ranks < demoted[:, None], ranks, pos_lin, demoted, enc)
    return jnp.stack([demoted, n], axis=1), (low, ring)
