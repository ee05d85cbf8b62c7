"""The quantized KV cache for step-by-step decoding, and the prompt fill.

  sink     [l, b, k, S', h]   the first S tokens, 16 bits
  window   [l, b, k, W', h]   ring of the W newest tokens (slot = (position - S) % W), 16 bits
  tiers    per tier of the policy's layout (kvjax.layout) and per segment of layers, a keys store
           and a values store (kvjax.stores), each at its width

Every array is allocated at the size what can reach it needs (S' = min(S, capacity), W' =
min(W, capacity - S), tiers from the policy); `nbytes` counts them exactly. When token p arrives
(one per sequence per step), `begin` routes it and token p - W, which leaves the window: the policy
picks its tier (kvjax.history.enter), and a full ring moves its oldest group down its chain; then
each layer's `attend` moves the K/V there, stores the new token and runs one softmax over every
tier (flash-decoding partials, merged). No positions are stored: which slots hold a token follows
from the counts of tokens that entered each tier (kvjax.layout).

Prompts enter through `prefill`: teacher-forced scoring (kvjax.teacher_forced) gives the prompt's
K/V and where each token went, and `fill` builds the state step-by-step decoding would have reached.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import kernels as kernel_choice
from kvjax import teacher_forced
from kvjax.cache import KVCache
from kvjax.config import ModelConfig
from kvjax.errors import KvjaxError
from kvjax.features import NUM_FEATURES
from kvjax.history import History, enter, entries
from kvjax.layout import Layout
from kvjax.stores import Dense, KiviKeys, KiviValues, Symmetric, _set, same_codes, staged_slots, store_class
from pallas_kernels import cpu_attention
from pallas_kernels import decode_attention as fused


@struct.dataclass
class TierStores:
    keys: tuple  # per segment: kvjax.stores store [l_seg, b, k, c, ...]
    values: tuple


@struct.dataclass
class Route:
    """Where this step's tokens go (the same for every layer), set by `TieredCache.begin`.
    Slots out of range mean "none"."""

    sink_slot: jax.Array  # int32 [b]: the arriving token's sink slot
    window_slot: jax.Array  # int32 [b]: its window slot, which the leaving token vacates
    leaving: jax.Array  # bool [b]: a token leaves the window this step
    tier: jax.Array  # int32 [b]: the tier it enters (or EVICTED / NO_ENTRY)
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
    route: Route | None
    policy: object = struct.field(pytree_node=False)  # kvjax.policies.Quantized
    layout: Layout = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)
    kernels: kernel_choice.Kernels = struct.field(pytree_node=False)  # resolved

    @classmethod
    def init(cls, policy, cfg: ModelConfig, batch: int, capacity: int, dtype, kernels=kernel_choice.Kernels.AUTO):
        """`dtype`: what 16-bit K/V, scales and zeros are stored in."""
        layout = policy.layout(cfg, capacity)
        dense = lambda slots: jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim), dtype)
        tiers = []
        for i, t in enumerate(layout.tiers):
            stores = {True: [], False: []}
            for s, (start, stop) in enumerate(layout.segments):
                shape = (stop - start, batch, cfg.num_kv_heads, t.slots, cfg.head_dim)
                for keys, bits in zip((True, False), layout.segment_bits(s, i)):
                    store = store_class(bits, t.symmetric, keys).init(shape, bits, layout.group_size, dtype)
                    stores[keys].append(_staged(store, i, layout))
            tiers.append(TierStores(tuple(stores[True]), tuple(stores[False])))
        features = layout.window_slots if policy.uses_features else 0
        return cls(dense(layout.sink_slots), dense(layout.sink_slots), dense(layout.window_slots),
                   dense(layout.window_slots), tuple(tiers), jnp.zeros((batch, len(layout.tiers)), jnp.int32),
                   jnp.zeros((batch, features, NUM_FEATURES), jnp.float32), jnp.zeros((batch,), jnp.int32), None,
                   policy, layout, capacity, kernel_choice.resolve(kernels))

    @property
    def segments(self):
        return self.layout.segments

    @property
    def uses_features(self) -> bool:
        return self.policy.uses_features

    # -- the steps the model calls ------------------------------------------------------

    def begin(self, positions):
        """Routes this step's tokens: positions int32 [b, 1]."""
        if positions.shape[1] != 1:
            raise KvjaxError("a quantized cache takes one token per sequence per step; prompts go through prefill")
        lay, p = self.layout, positions[:, 0]
        S, W, g = lay.sinks, lay.window, lay.group_size
        window_slot = jnp.where(p >= S, (p - S) % W, lay.window_slots)
        leave = jnp.where(p - W >= S, p - W, -1)
        features = self.window_features[jnp.arange(p.shape[0]), jnp.minimum(window_slot, lay.window_slots - 1)] \
            if self.uses_features else jnp.zeros((p.shape[0], NUM_FEATURES), jnp.float32)
        tier, rank, entered = enter(self.policy, lay, self.entered, leave, features)
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
        route = Route(jnp.where((p >= 0) & (p < S), p, lay.sink_slots), window_slot, leave >= 0, tier, slot,
                      tuple(m[1] for m in moves), tuple(m[0] for m in moves))
        return self.replace(entered=entered, route=route)

    def attend(self, layer, q, k, v, positions):
        """One layer of a decode step: moves the token leaving the window to its tier (after any
        demotions), stores this step's k, v [b, 1, k, h], and attends q [b, 1, n, h] over every tier:
        one softmax over their union (flash-decoding partials). -> (out [b, 1, n, h], cache).

        The tier stores are views that write into their whole arrays (kvjax.stores says why). The
        CPU kernel reads the sink and window where they lie too, and this step's token beside them;
        the other paths work on the layer's sink and window slices, written back at the end."""
        lay, r = self.layout, self.route
        seg, li = layer.segment, layer.index
        local = li - lay.segments[seg][0]
        rows = jnp.arange(k.shape[0])
        native = kernel_choice.native_attention(self.kernels)
        dense = (self.sink_k, self.sink_v, self.window_k, self.window_v)
        sink_k, sink_v, window_k, window_v = dense if native else (x[li] for x in dense)
        tiers = [(t.keys[seg].layer(local), t.values[seg].layer(local)) for t in self.tiers]  # this layer's stores
        read = (li, rows) if native else (rows,)
        read += (slice(None), jnp.minimum(r.window_slot, lay.window_slots - 1))
        old_k, old_v = window_k[read], window_v[read]  # [b, k, h]: the token leaving the window
        # The tier views write into their whole arrays in place; what this step reads of a tier before
        # writing it (a demoted group) is made an input of every later write (`tie`), so that XLA
        # orders the read first instead of copying the whole array to keep it.
        tie = jnp.zeros((), jnp.float32)
        for (src, dst), (from_slot, to_slot) in zip(r.move_tiers, r.move_slots):
            moved = []
            for a, b in zip(tiers[src], tiers[dst]):
                b, tie = self._move_group(a, b, rows, from_slot, to_slot, tie)
                moved.append(b)
            tiers[dst] = tuple(moved)
        old_k, old_v = _after(tie, old_k), _after(tie, old_v)
        for i, t in enumerate(lay.tiers):
            if t.slots and i in lay.heads:  # leaving tokens enter heads only; the rest get whole groups
                slot = jnp.where(r.leaving & (r.tier == i), r.slot, t.slots)
                tiers[i] = (tiers[i][0].write(rows, slot, old_k, self.kernels),
                            tiers[i][1].write(rows, slot, old_v, self.kernels))

        new_k, new_v = k[:, 0], v[:, 0]  # [b, k, h]
        qs, tokens = q[:, 0], positions[:, 0] + 1  # [b, n, h]; tokens stored so far, this one included
        slots = lambda n: jnp.arange(n)[None, :]
        sink_valid = slots(lay.sink_slots) < jnp.minimum(tokens, lay.sinks)[:, None]
        window_valid = slots(lay.window_slots) < jnp.clip(tokens - lay.sinks, 0, lay.window)[:, None]
        sink_at, window_at = (rows, slice(None), r.sink_slot), (rows, slice(None), r.window_slot)
        if native:  # the new token as a part of its own: its slot is written after the kernel read the layer
            stored = lambda x: x.astype(self.window_k.dtype)[None, :, :, None]  # [1, b, k, 1, h]
            not_at = lambda slot, n: slots(n) != slot[:, None]
            parts = [cpu_attention.Part.floats(sink_k, sink_v, sink_valid & not_at(r.sink_slot, lay.sink_slots), li),
                     cpu_attention.Part.floats(window_k, window_v,
                                               window_valid & not_at(r.window_slot, lay.window_slots), li),
                     cpu_attention.Part.floats(stored(new_k), stored(new_v), jnp.ones((k.shape[0], 1), bool), 0)]
            out = self._native_attention(qs, parts, tiers)
            after = functools.partial(_after, out.reshape(-1)[0])
            put = lambda full, at, x: _set(full, (li,) + at, after(x))
            sink_k, sink_v = put(sink_k, sink_at, new_k), put(sink_v, sink_at, new_v)
            window_k, window_v = put(window_k, window_at, new_k), put(window_v, window_at, new_v)
        else:
            sink_k, sink_v = _set(sink_k, sink_at, new_k), _set(sink_v, sink_at, new_v)
            window_k, window_v = _set(window_k, window_at, new_k), _set(window_v, window_at, new_v)
            parts = [fused.dense_partials(qs, sink_k, sink_v, sink_valid),
                     fused.dense_partials(qs, window_k, window_v, window_valid)]
            for i, t in enumerate(lay.tiers):
                if t.slots:
                    parts += self._tier_partials(i, *tiers[i], qs)
            out = fused.merge_partials(parts)
            # The sink and window slices are written back only after the attention has read them:
            # without this data dependency XLA copies each whole [l, ...] array whose slice is read
            # (measured in the decode step's HLO).
            after = functools.partial(_after, out.reshape(-1)[0])
            put = lambda full, part: full.at[li].set(after(part))
            sink_k, sink_v = put(self.sink_k, sink_k), put(self.sink_v, sink_v)
            window_k, window_v = put(self.window_k, window_k), put(self.window_v, window_v)
        return out[:, None].astype(q.dtype), self.replace(
            sink_k=sink_k, sink_v=sink_v, window_k=window_k, window_v=window_v,
            tiers=tuple(TierStores(_replace_at(t.keys, seg, keys.whole()), _replace_at(t.values, seg, values.whole()))
                        for t, (keys, values) in zip(self.tiers, tiers)))

    def _move_group(self, a, b, rows, from_slot, to_slot, tie):
        """A ring's oldest group from store a into store b (one layer, one side): its codes copied if the
        two store alike, else decoded and re-encoded. -> (b, tie): b is written after `tie`, and the
        new tie is read from b once written, so whatever comes after it also comes after this read of a
        (a tie read from the group itself would not do: XLA computes one element of it apart)."""
        g = self.layout.group_size
        if same_codes(type(a), type(b), getattr(a, "bits", 16), getattr(b, "bits", 16)):
            raw = jax.tree_util.tree_map(functools.partial(_after, tie), a.take_raw(from_slot, g))
            b = b.put_raw(rows, to_slot, raw)
        else:
            b = b.write_group(rows, to_slot, _after(tie, a.read_group(from_slot, g, jnp.float32)), self.kernels)
        return b, tie + getattr(b, b.SLOTS[0]).reshape(-1)[0].astype(jnp.float32)

    def _tier_partials(self, i, keys, values, qs):
        """Partials of qs [b, n, h] over tier i, given this layer's stores of its keys and values."""
        lay, t, entered = self.layout, self.layout.tiers[i], self.entered[:, i]
        g = lay.group_size
        stage_start, staged = lay.stage_start(i, entered), entered % g
        interpret = kernel_choice.fused_attention(self.kernels)
        kivi = isinstance(keys, KiviKeys) and isinstance(values, KiviValues) and keys.bits == values.bits
        sym = isinstance(keys, Symmetric) and isinstance(values, Symmetric) and keys.bits == values.bits
        fused_here = interpret is not None and (kivi or sym) and not t.ring  # the kernel reads tiers filled in order
        if fused_here:
            blocks = fused.auto_blocks(qs.shape[0], keys.codes.shape[2], t.slots)
        if fused_here and sym:
            return [fused.tier_attention_partials(qs, keys.get("codes"), keys.get("scale"), None, values.get("codes"),
                                                  values.get("scale"), None, entered, bits=keys.bits, group_size=g,
                                                  blocks=blocks, interpret=interpret)]
        if fused_here:  # KIVI: the full groups in the kernel, the stage beside it
            full = entered // g * g
            packed = fused.tier_attention_partials(qs, *(keys.get(f) for f in ("codes", "scale", "zero")),
                                                   *(values.get(f) for f in ("codes", "scale", "zero")), full,
                                                   bits=keys.bits, group_size=g, blocks=blocks, interpret=interpret)
            if not keys.stage.shape[-2]:  # a tier reached only by demotion holds whole groups
                return [packed]
            stage = fused.dense_partials(qs, keys.get("stage"), values.read_group(full, g, qs.dtype),
                                         slots_below(g, staged))
            return [packed, stage]
        b, n, h = qs.shape
        heads = getattr(keys, keys.SLOTS[0]).shape[2]
        qg = qs.reshape(b, heads, n // heads, h).astype(jnp.float32)  # [b, k, g, h]
        scores = keys.scores(qg, stage_start, staged) * h ** -0.5
        return [fused.partials_of(scores, lay.valid_slots(i, entered), values.mix)]

    def _native_attention(self, qs, parts, tiers):
        """Attention of qs [b, n, h] over one layer through the CPU kernel (pallas_kernels.cpu_attention):
        one call over the given float parts (sink, window, token) and every tier it takes; tiers it does
        not take are attended beside it. -> float32 [b, n, h]."""
        lay, g = self.layout, self.layout.group_size
        parts = [p for p in parts if p.keys.shape[-2]]
        beside = []
        for i, t in enumerate(lay.tiers):
            if t.slots:
                native = self._native_parts(i, *tiers[i], qs.shape[-1])
                parts += native or []
                beside += [] if native is not None else self._tier_partials(i, *tiers[i], qs)
        return fused.merge_partials([cpu_attention.attention_partials(qs, parts, group_size=g)] + beside)

    def _native_parts(self, i, keys, values, head_dim: int):
        """Tier i as parts of the CPU kernel (None if it takes neither form): every valid slot whose key
        is packed, and the KIVI keys still in the 16-bit stage with their values in the tier."""
        lay, entered, g = self.layout, self.entered[:, i], self.layout.group_size
        valid = lay.valid_slots(i, entered)  # [b, c]
        if isinstance(keys, Dense) and isinstance(values, Dense):
            return [cpu_attention.Part.floats(keys.x, values.x, valid, keys.at)]
        if not _packed_pair(keys, values) or not cpu_attention.supported(head_dim, g, isinstance(keys, Symmetric)):
            return None
        kivi = isinstance(keys, KiviKeys)
        packed = lambda valid: cpu_attention.packed_part(  # the whole [l, ...] arrays: read in place
            keys.codes, keys.scale, keys.zero if kivi else None, values.codes, values.scale,
            values.zero if kivi else None, valid, keys.at, key_bits=keys.bits, value_bits=values.bits, symmetric=not kivi)
        if not (kivi and keys.stage.shape[-2]):
            return [packed(valid)]
        start, count = lay.stage_start(i, entered), entered % g
        stage = dataclasses.replace(packed(slots_below(g, count)), keys=keys.stage, key_scale=None, key_zero=None,
                                    key_bits=cpu_attention.FLOATS,
                                    value_offset=jnp.minimum(start, valid.shape[1] - g))  # a full tier stages none
        return [packed(valid & ~staged_slots(valid.shape[1], start, count)), stage]

    def advance(self, positions):
        return self.replace(lengths=jnp.maximum(self.lengths, positions.max(axis=1) + 1), route=None)

    def record_features(self, positions, features):
        """Keeps this step's token features [b, 1, F] for when the token leaves the window."""
        if not self.uses_features:
            return self
        p, lay = positions[:, 0], self.layout
        slot = jnp.where(p >= lay.sinks, (p - lay.sinks) % lay.window, lay.window_slots)
        rows = jnp.arange(p.shape[0])
        return self.replace(window_features=self.window_features.at[rows, slot].set(features[:, 0], mode="drop"))

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

    def prefill(self, params, cfg, tokens, positions, dtype):
        logits, tf, features = teacher_forced.score_with_features(
            params, cfg, tokens, positions, policy=self.policy, capacity=self.capacity, dtype=dtype,
            kv_dtype=self.window_k.dtype)
        return logits, self.fill(tf, features, positions)

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
            empty = jnp.zeros(x.shape[:3] + (slots,) + x.shape[4:], x.dtype)
            return empty.at[:, rows, :, slot].set(x.transpose(1, 3, 0, 2, 4), mode="drop")

        valid = j < n[:, None]
        sink_slot = jnp.where(valid & (j < lay.sinks), j, lay.sink_slots)
        in_window = valid & (j >= lay.sinks) & (j > last[:, None] - lay.window)
        window_slot = jnp.where(in_window, (j - lay.sinks) % lay.window, lay.window_slots)
        hist = History.of(lay, tf.tier, tf.rank)
        where = hist.tier_at(last)  # [b, T]
        entered = []
        for i in range(len(lay.tiers)):
            h, d = _place_in_chains(lay, i)
            entered.append(jnp.sum((hist.tier == h) & (hist.reach[:, d] <= last[:, None]), axis=1))
        entered = jnp.stack(entered, axis=1).astype(jnp.int32) if lay.tiers else self.entered
        tiers = []
        for i, t in enumerate(lay.tiers):
            _, d = _place_in_chains(lay, i)
            slot = jnp.where(where == i, t.slot_of(tf.rank), t.slots)
            stores = {True: [], False: []}
            for s, (start, stop) in enumerate(lay.segments):
                ks, vs = k_all[start:stop], v_all[start:stop]
                if d:  # it holds what the tier before it gave back
                    ks, vs = teacher_forced.stored_forms(lay, s, ks, vs, hist)[d - 1]
                for keys, x, bits in zip((True, False), (ks, vs), lay.segment_bits(s, i)):
                    stores[keys].append(_staged(store_class(bits, t.symmetric, keys).fill(
                        place(x, slot, t.slots), bits, lay.group_size, self.kernels, self.window_k.dtype,
                        stage_start=lay.stage_start(i, entered[:, i])), i, lay))
            tiers.append(TierStores(tuple(stores[True]), tuple(stores[False])))
        window_features = self.window_features
        if self.uses_features:
            window_features = window_features.at[rows, window_slot].set(features, mode="drop")
        return self.replace(sink_k=place(k_all, sink_slot, lay.sink_slots), sink_v=place(v_all, sink_slot, lay.sink_slots),
                            window_k=place(k_all, window_slot, lay.window_slots),
                            window_v=place(v_all, window_slot, lay.window_slots), tiers=tuple(tiers), entered=entered,
                            window_features=window_features, lengths=n.astype(jnp.int32))


def _packed_pair(keys, values) -> bool:
    """Keys and values both packed alike (KIVI, or symmetric), at any widths."""
    return (isinstance(keys, KiviKeys) and isinstance(values, KiviValues)) or \
        (isinstance(keys, Symmetric) and isinstance(values, Symmetric))


def _staged(store, tier: int, layout: Layout):
    """KIVI keys keep a 16-bit stage for the group being filled only where leaving tokens enter."""
    return store if tier in layout.heads or not isinstance(store, KiviKeys) else store.without_stage()


def _after(tie, x):
    """x, with a data dependency on the scalar `tie` that XLA cannot remove (its value is x unless tie is NaN)."""
    return jnp.where(jnp.isnan(tie), jnp.zeros_like(x), x)


def slots_below(g: int, count):
    return jnp.arange(g)[None, :] < count[:, None]


def _replace_at(items: tuple, i: int, item) -> tuple:
    return items[:i] + (item,) + items[i + 1:]


def _place_in_chains(layout: Layout, tier: int) -> tuple[int, int]:
    """(head, depth) of a tier in the chain that reaches it."""
    for h in layout.heads:
        chain = layout.chain(h)
        if tier in chain:
            return h, chain.index(tier)
    raise ValueError(f"tier {tier} is in no chain")
