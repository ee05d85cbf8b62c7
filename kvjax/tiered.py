"""The quantized KV cache for step-by-step decoding, and the prompt fill.

  sink     [l, b, k, S', h]   the first S tokens, 16 bits
  window   [l, b, k, W', h]   ring of the W newest tokens (slot = (position - S) % W), 16 bits
  tiers    per tier of the policy's layout (kvjax.layout) and per store segment of layers, a keys
           store and a values store (kvjax.stores), each at its width (per layer: ByWidth)

Every array is allocated at the size what can reach it needs (S' = min(S, capacity), W' =
min(W, capacity - S), tiers from the policy); `nbytes` counts them exactly. When token p arrives
(one per sequence per step), `begin` routes it and token p - W, which leaves the window: the policy
picks its tier (kvjax.history.enter), and a full ring moves its oldest group down its chain; then
each layer's `attend` moves the K/V there, stores the new token and runs one softmax over every
tier (flash-decoding partials, merged). No positions are stored: which slots hold a token follows
from the counts of tokens that entered each tier (kvjax.layout).

Prompts enter in chunks (kvjax.chunk: a chunk's tokens as t decode steps at once). `fill` builds,
from teacher-forced scoring (kvjax.teacher_forced), the state step-by-step decoding would have
reached, and `filled` the state after given K/V (benchmarks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import chunk, teacher_forced
from kvjax.cache import KVCache
from kvjax.config import ModelConfig
from kvjax.features import NUM_FEATURES
from kvjax.history import History, enter, entries
from kvjax.layout import Layout
from kvjax.kernels import Backend, Kernels, resolve
from kvjax.stores import (ByWidth, Dense, Symmetric, TierStores, after_reading, moved, staged_slots, store_class,
                          write_slots)
from pallas_kernels.xla_attention import FLOATS, Part


@struct.dataclass
class Route:
    """Where this step's tokens go (the same for every layer), set by `TieredCache.begin`.
    Slots out of range mean "none"."""

    sink_slot: jax.Array  # int32 [b]: the arriving token's sink slot
    window_slot: jax.Array  # int32 [b]: its window slot, which the leaving token vacates
    leaving: jax.Array  # bool [b]: a token leaves the window this step
    tier: jax.Array  # int32 [b]: the tier it enters (or EVICTED / NO_ENTRY)
    rank: jax.Array  # int32 [b]: its rank there
    slot: jax.Array  # int32 [b]: its slot there
    move_slots: tuple  # ((from slot [b], to slot [b]), ...): the groups demoted this step, deepest first
    move_tiers: tuple = struct.field(pytree_node=False, default=())  # ((from tier, to tier), ...), as move_slots


@struct.dataclass
class TieredCache(KVCache):
    sink_k: jax.Array  # [l, b, k, S', h]
    sink_v: jax.Array
    window_k: jax.Array  # [l, b, k, W', h]
    window_v: jax.Array
    tiers: tuple  # TierStores per tier of the layout
    entered: jax.Array  # int32 [b, tiers]: tokens that ever entered each tier
    window_features: jax.Array  # float32 [b, W' or 0, F]: features of the window's tokens
    lengths: jax.Array  # int32 [b]
    route: Route | chunk.ChunkRoute | None  # set by `begin` for the layers of one step (or chunk)
    policy: object = struct.field(pytree_node=False)  # kvjax.policies.Quantized
    layout: Layout = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)
    backend: Backend = struct.field(pytree_node=False)  # kvjax.kernels.resolve's

    @classmethod
    def init(cls, policy, cfg: ModelConfig, batch: int, capacity: int, dtype, kernels=Kernels.AUTO):
        """`dtype`: what 16-bit K/V, scales and zeros are stored in."""
        layout = policy.layout(cfg, capacity)
        dense = lambda slots: jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim), dtype)

        def empty(i, side, bits, layers):
            shape = (len(layers), batch, cfg.num_kv_heads, layout.tiers[i].slots, cfg.head_dim)
            return store_class(bits, layout.tiers[i].symmetric, side == 0).init(shape, bits, layout.group_size, dtype)

        tiers = _tier_stores(layout, empty)
        features = layout.window_slots if policy.uses_features else 0
        return cls(dense(layout.sink_slots), dense(layout.sink_slots), dense(layout.window_slots),
                   dense(layout.window_slots), tuple(tiers), jnp.zeros((batch, len(layout.tiers)), jnp.int32),
                   jnp.zeros((batch, features, NUM_FEATURES), jnp.float32), jnp.zeros((batch,), jnp.int32), None,
                   policy, layout, capacity, resolve(kernels))

    @property
    def segments(self):
        """The runs of layers the model scans: in a decode step, layers of the same widths (each store
        static: no dispatch per token); in a prompt chunk, layers stored alike (one scan for widths
        that differ by layer, whose dispatch a chunk's work amortizes; and one program to compile)."""
        return self.layout.store_segments if isinstance(self.route, chunk.ChunkRoute) else self.layout.segments

    @property
    def rotation(self):
        return self.layout.rotation

    @property
    def uses_features(self) -> bool:
        return self.policy.uses_features

    @property
    def max_chunk(self) -> int | None:
        return chunk.max_tokens(self.layout, self.uses_features)

    # -- the steps the model calls ------------------------------------------------------

    def begin(self, positions):
        """Routes this step's tokens: positions int32 [b, 1] (a chunk of t > 1: kvjax.chunk.begin)."""
        if positions.shape[1] != 1:
            return chunk.begin(self, positions)
        route, entered = self.route_step(positions[:, 0], self.entered)
        return self.replace(entered=entered, route=route)

    def route_step(self, p, entered) -> tuple[Route, jax.Array]:
        """One step of decoding's bookkeeping: where the token at positions p [b] (-1: none) goes, where
        the token leaving the window for it goes, and which groups move down their chains, given the
        tokens that had entered each tier, entered [b, n] -> (Route, entered after the step)."""
        lay = self.layout
        g = lay.group_size
        window_slot, leave = lay.window_slot(p), lay.leaving(p)
        features = self.window_features[jnp.arange(p.shape[0]), jnp.minimum(window_slot, lay.window_slots - 1)] \
            if self.uses_features else jnp.zeros((p.shape[0], NUM_FEATURES), jnp.float32)
        tier, rank, entered = enter(self.policy, lay, entered, leave, features)
        slot = jnp.zeros_like(rank)
        for i, t in enumerate(lay.tiers):
            slot = jnp.where(tier == i, t.slot_of(rank), slot)
        moves = []
        for h in lay.heads:
            chain = lay.chain(h)
            for d in range(len(chain) - 1):  # a new group entering the chain pushes one group per full ring
                src, dst = chain[d], chain[d + 1]
                start = rank - lay.through(chain, d)  # the group that leaves depth d (in ranks of the chain)
                moving = (tier == h) & (rank % g == 0) & (start >= 0)
                if lay.tiers[src].slots and lay.tiers[dst].slots:  # a tier sized to 0 slots: no group moves
                    moves.append(((src, dst), (jnp.where(moving, lay.tiers[src].slot_of(start), lay.tiers[src].slots),
                                               jnp.where(moving, lay.tiers[dst].slot_of(start), lay.tiers[dst].slots))))
                entered = entered.at[:, dst].add(jnp.where(moving, g, 0))
        moves = moves[::-1]
        route = Route(lay.sink_slot(p), window_slot, leave >= 0, tier, rank, slot,
                      tuple(m[1] for m in moves), tuple(m[0] for m in moves))
        return route, entered

    def attend(self, layer, q, k, v, positions):
        """One layer of a decode step: moves the token leaving the window to its tier (after any
        demotions), attends q [b, 1, n, h] over every part of the layer and this step's k, v
        [b, 1, k, h] (one softmax over their union, through the backend), then stores k, v.
        -> (out [b, 1, n, h], cache). A chunk of prompt tokens (t > 1) goes through kvjax.chunk.

        Every part is read where it lies, in the cache's whole [l, ...] arrays (stores' layer views):
        a slice of a layer that is written and read again in one step would be copied by XLA."""
        if q.shape[1] != 1:
            return chunk.attend(self, layer, q, k, v, positions)
        lay, r, li = self.layout, self.route, layer.index
        seg = lay.store_segment_of(layer.segment)  # layer.segment: a width segment, in this store segment
        local, first = li - lay.store_segments[seg][0], lay.segments[layer.segment][0] - lay.store_segments[seg][0]
        view = lambda s: s.layer(local, s.choice[first]) if isinstance(s, ByWidth) else s.layer(local)
        rows = jnp.arange(k.shape[0])
        tiers = [(view(t.keys[seg]), view(t.values[seg])) for t in self.tiers]  # this layer's stores (static widths)
        leaving = (li, rows, slice(None), jnp.minimum(r.window_slot, lay.window_slots - 1))
        old_k, old_v = self.window_k[leaving], self.window_v[leaving]  # [b, k, h]: the token leaving the window
        # The tier views write into their whole arrays in place; what this step reads of a tier before
        # writing it (a demoted group) is made an input of every later write (`tie`), so that XLA
        # orders the read first instead of copying the whole array to keep it. The tie starts from the
        # query, so that the writes also come after the layer before read the arrays (its attention):
        # layers a scan of one layer runs are straight-line code, where XLA would copy them instead.
        tie = q.reshape(-1)[0].astype(jnp.float32)
        for (src, dst), (from_slot, to_slot) in zip(r.move_tiers, r.move_slots):
            written = []
            for a, b in zip(tiers[src], tiers[dst]):
                b, tie = self._move_group(a, b, from_slot, to_slot, tie)
                written.append(b)
            tiers[dst] = tuple(written)
        old_k, old_v = after_reading(tie, old_k), after_reading(tie, old_v)
        for i, t in enumerate(lay.tiers):
            if t.slots and i in lay.heads:  # leaving tokens enter heads only; the rest get whole groups
                slot = jnp.where(r.leaving & (r.tier == i), r.slot, t.slots)
                tiers[i] = (tiers[i][0].write(slot, old_k, self.backend),
                            tiers[i][1].write(slot, old_v, self.backend))

        new_k, new_v = k[:, 0], v[:, 0]  # [b, k, h]
        tokens = positions[:, 0] + 1  # tokens stored so far, this one included
        slots = lambda n: jnp.arange(n)[None, :]
        not_at = lambda slot, n: slots(n) != slot[:, None]  # the slot this step's token takes: written after
        sink_valid = (slots(lay.sink_slots) < jnp.minimum(tokens, lay.sinks)[:, None]) & not_at(r.sink_slot,
                                                                                                 lay.sink_slots)
        window_valid = (slots(lay.window_slots) < jnp.clip(tokens - lay.sinks, 0, lay.window)[:, None]) & not_at(
            r.window_slot, lay.window_slots)
        stored = lambda x: x.astype(self.window_k.dtype)[None, :, :, None]  # [1, b, k, 1, h]
        parts = [Part.floats(self.sink_k, self.sink_v, sink_valid, li),
                 Part.floats(self.window_k, self.window_v, window_valid, li),
                 Part.floats(stored(new_k), stored(new_v), (positions >= 0), 0)]
        for i, t in enumerate(lay.tiers):
            if t.slots:
                parts += self._tier_parts(i, *tiers[i])
        out = self.backend.attend(q[:, 0], parts, group_size=lay.group_size)
        # The sink and window are written after the attention has read them: without this data
        # dependency XLA copies each whole [l, ...] array whose slice is read (measured in the HLO).
        read = out.reshape(-1)[0]
        put = lambda full, slot, x: write_slots(full, slot[:, None], after_reading(read, x)[:, None], li)
        return out[:, None].astype(q.dtype), self.replace(
            sink_k=put(self.sink_k, r.sink_slot, new_k), sink_v=put(self.sink_v, r.sink_slot, new_v),
            window_k=put(self.window_k, r.window_slot, new_k), window_v=put(self.window_v, r.window_slot, new_v),
            tiers=tuple(t.with_segment(seg, keys, values) for t, (keys, values) in zip(self.tiers, tiers)))

    def _move_group(self, a, b, from_slot, to_slot, tie):
        """A ring's oldest group from store a into store b (one layer, one side): its codes copied if the
        two store alike, else decoded and re-encoded. -> (b, tie): b is written after `tie`, and the
        new tie is read from b once written, so whatever comes after it also comes after this read of a
        (a tie read from the group itself would not do: XLA computes one element of it apart)."""
        raw = jax.tree_util.tree_map(functools.partial(after_reading, tie),
                                     a.take_raw(from_slot, self.layout.group_size))
        b = b.put_raw(to_slot, moved(b, a, raw, self.backend, pred=jnp.any(to_slot < b.slots)))
        return b, tie + b.probe()

    def _tier_parts(self, i, keys, values) -> list[Part]:
        """Tier i as parts of a layer's attention, given this layer's stores of its keys and values:
        its slots, and the KIVI keys still in the 16-bit stage (their values already in the tier); for
        stores by width, the layer's own (a decode step knows it while tracing)."""
        if isinstance(keys, ByWidth):
            return self._tier_parts(i, keys.stores[keys.which], values.stores[values.which])
        lay, entered, g = self.layout, self.entered[:, i], self.layout.group_size
        valid = lay.valid_slots(i, entered)  # [b, c]
        ring, c = lay.tiers[i].ring, valid.shape[1]
        side = lambda s: ((s.x, None, None, FLOATS) if isinstance(s, Dense) else
                          (s.codes, s.scale, getattr(s, "zero", None), s.bits))
        (k_x, k_scale, k_zero, k_bits), (v_x, v_scale, v_zero, v_bits) = side(keys), side(values)
        symmetric = isinstance(keys, Symmetric) or isinstance(values, Symmetric)
        part = lambda valid, count: Part(k_x, k_scale, k_zero, v_x, v_scale, v_zero, valid, keys.at, count=count,
                                         key_bits=k_bits, value_bits=v_bits, symmetric=symmetric)
        if not keys.staged:
            return [part(valid, None if ring else entered)]
        start, staged = lay.stage_start(i, entered), entered % g
        stage = Part(keys.stage, None, None, v_x, v_scale, v_zero, slots_below(g, staged), keys.at,
                     value_offset=jnp.minimum(start, c - g), value_bits=v_bits)  # a full tier stages none
        return [part(valid & ~staged_slots(c, start, staged), None if ring else entered // g * g), stage]

    def advance(self, positions):
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1), route=None)

    def record_features(self, positions, features):
        """Keeps the features [b, t, F] of this step's tokens (positions [b, t]) for when they leave the window."""
        if not self.uses_features:
            return self
        slot = self.layout.window_slot(positions)  # [b, t]
        rows = jnp.arange(positions.shape[0])[:, None]
        return self.replace(window_features=self.window_features.at[rows, slot].set(features, mode="drop"))

    # -- what users read ----------------------------------------------------------------

    def tokens_per_tier(self):
        lay = self.layout
        out = {"sink": jnp.minimum(self.lengths, lay.sinks),
               "window": jnp.clip(self.lengths - lay.sinks, 0, lay.window)}
        for i, t in enumerate(lay.tiers):
            out[t.label] = out.get(t.label, 0) + lay.held(i, self.entered[:, i])
        return out

    def stored_bits(self):
        """Average bits of the left tokens' K/V, float32 [b] (NaN while none has left)."""
        held = [self.layout.held(i, self.entered[:, i]) for i in range(len(self.layout.tiers))]
        bits = sum(h * t.mean_bits() for h, t in zip(held, self.layout.tiers))
        count = sum(held) if held else jnp.zeros_like(self.lengths)
        return jnp.where(count > 0, bits / jnp.maximum(count, 1), jnp.nan)

    # -- prompts ------------------------------------------------------------------------

    def filled(self, k_all, v_all, positions, features=None):
        """The state after a sequence whose K/V are given: k_all, v_all [l, b, k, T, h], positions [b, T]
        (features [b, T, F], default zeros): the policy routes its tokens as decoding would, stored as
        decoding stores them (16-bit K/V in the cache's storage dtype)."""
        b, T = positions.shape
        k_all, v_all = k_all.astype(self.window_k.dtype), v_all.astype(self.window_k.dtype)
        features = jnp.zeros((b, T, NUM_FEATURES), jnp.float32) if features is None else features
        tier, rank, _ = entries(self.policy, self.layout, positions, features, jnp.zeros_like(self.entered))
        tf = teacher_forced.TeacherForcedCache(k_all, v_all, tier, rank, jnp.sum(positions >= 0, axis=1), None,
                                               self.layout)
        return self.fill(tf, features, positions)

    def fill(self, tf, features, positions):
        """The state after step-by-step decoding of a whole sequence, from its teacher-forced cache `tf`
        (every token's K/V [l, b, k, T, h], tier and rank), features [b, T, F], positions [b, T]."""
        lay = self.layout
        b, T = positions.shape
        rows, j = jnp.arange(b)[:, None], jnp.arange(T)[None, :]
        n = jnp.sum(positions >= 0, axis=1)  # [b]
        last = n - 1  # the step whose state this is
        k_all, v_all = tf.k, tf.v

        def place(x, slot, slots):  # x [l, b, k, T, h] -> [l, b, k, slots, h] with token j at slot[b, j]
            return write_slots(jnp.zeros(x.shape[:3] + (slots,) + x.shape[4:], x.dtype), slot, x)

        valid = j < n[:, None]
        sink_slot = lay.sink_slot(jnp.where(valid, j, -1))
        window_slot = lay.window_slot(jnp.where(valid & ~lay.has_left(j, last[:, None]), j, -1))
        hist = History.of(lay, tf.tier, tf.rank)
        where = hist.tier_at(last)  # [b, T]
        entered = []
        for i in range(len(lay.tiers)):
            h, d = _place_in_chains(lay, i)
            entered.append(jnp.sum((hist.tier == h) & (hist.reach[:, d] <= last[:, None]), axis=1))
        entered = jnp.stack(entered, axis=1).astype(jnp.int32) if lay.tiers else self.entered
        forms = {}  # per tier: its keys and values [l, b, k, T, h], as it holds them
        for i, t in enumerate(lay.tiers):
            d = _place_in_chains(lay, i)[1]
            if not d:
                forms[i] = (k_all, v_all)
            else:  # it holds what the tier before it gave back: per width segment, the widths are static
                per_segment = [teacher_forced.stored_forms(lay, s, k_all[a:b], v_all[a:b], hist)[d - 1]
                               for s, (a, b) in enumerate(lay.segments)]
                forms[i] = tuple(jnp.concatenate([f[side] for f in per_segment]) for side in (0, 1))

        def filled(i, side, bits, layers):
            t = lay.tiers[i]
            slot = jnp.where(where == i, t.slot_of(tf.rank), t.slots)
            return store_class(bits, t.symmetric, side == 0).fill(
                place(forms[i][side][jnp.asarray(layers)], slot, t.slots), bits, lay.group_size, self.backend,
                self.window_k.dtype, stage_start=lay.stage_start(i, entered[:, i]))

        tiers = _tier_stores(lay, filled)
        window_features = self.window_features
        if self.uses_features:
            window_features = window_features.at[rows, window_slot].set(features, mode="drop")
        return self.replace(sink_k=place(k_all, sink_slot, lay.sink_slots), sink_v=place(v_all, sink_slot, lay.sink_slots),
                            window_k=place(k_all, window_slot, lay.window_slots),
                            window_v=place(v_all, window_slot, lay.window_slots), tiers=tiers, entered=entered,
                            window_features=window_features, lengths=n.astype(jnp.int32))


def _tier_stores(layout: Layout, make) -> tuple:
    """TierStores per tier of the layout, from make(tier, side, bits, layers) -> the store of one side
    (0: keys) at `bits` for those layers (a list, indices of the whole model's layers), per store
    segment: one store per side where every layer of the segment stores alike, else a ByWidth over
    the (key, value) widths its layers use. KIVI keys keep their 16-bit stage only where
    `Layout.keeps_key_stage` says."""
    tiers = []
    for i, t in enumerate(layout.tiers):
        keys, values = [], []
        for start, stop in layout.store_segments:
            widths = list(dict.fromkeys(t.bits_of(layer) for layer in range(start, stop)))  # in order of first use
            choice = [widths.index(t.bits_of(layer)) for layer in range(start, stop)]
            members = [[start + n for n, c in enumerate(choice) if c == j] for j in range(len(widths))]
            keeps_stage = layout.keeps_key_stage(i, t.key_bits[start])  # the same kind in the whole segment
            pair = []
            for side in (0, 1):
                stores = [make(i, side, bits[side], layers) for bits, layers in zip(widths, members)]
                stores = [s.without_stage() if side == 0 and s.staged and not keeps_stage else s for s in stores]
                place = tuple(members[c].index(start + n) for n, c in enumerate(choice))
                pair.append(stores[0] if len(stores) == 1 else ByWidth(tuple(stores), tuple(choice), place))
            keys.append(pair[0])
            values.append(pair[1])
        tiers.append(TierStores(tuple(keys), tuple(values)))
    return tuple(tiers)


def slots_below(g: int, count):
    return jnp.arange(g)[None, :] < count[:, None]


def _place_in_chains(layout: Layout, tier: int) -> tuple[int, int]:
    """(head, depth) of a tier in the chain that reaches it."""
    for h in layout.heads:
        chain = layout.chain(h)
        if tier in chain:
            return h, chain.index(tier)
    raise ValueError(f"tier {tier} is in no chain")
