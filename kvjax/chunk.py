"""A chunk of prompt tokens through a quantized cache (kvjax.tiered): t decode steps at once.

Prefill (kvjax.generation.prefill) feeds a prompt through the model a chunk at a time, and
TieredCache's `begin` and `attend` hand each chunk here, which attends all its queries at once. Every
query of the chunk sees each token in exactly the state step-by-step decoding holds it in at the
query's step (the rules of kvjax.layout), whether the token came before the chunk or with it (a chunk
longer than W sees its own first tokens leave the window and pass down the tiers), and the cache ends
in the state decoding would leave; meanwhile only the chunk's own 16-bit K/V, and scores for its t
queries, exist: a long prompt never exists in full precision.

`begin`: decoding's bookkeeping (TieredCache.route_step) for each of the t steps: which tier each token
leaving the window enters, and so the step (position) at which each rank of a chain's first tier
enters it. From those, every state change has a step: a group of rank r leaves depth d of its chain
when rank r // G * G + Layout.through(chain, d) enters, its KIVI keys are quantized when its last
rank enters.

`attend`, for one layer, as float banks whose masks [b, t, slots] say which query sees what
(pallas_kernels.xla_attention.chunk_partials):
  16-bit      the sinks and the window as the chunk found them, and the chunk's own tokens (causally),
              each until it leaves the window;
  as stored   each tier's slots as the chunk found them, decoded block by block, until their group
              moves to the next tier of its chain;
  arriving    per chain and depth, the ranks that reach that depth during the chunk: at depth 0 the
              tokens leaving the window (with the KIVI group that was being filled), at depth d > 0
              the groups moved there. Each is encoded from what the depth before gives (the 16-bit
              K/V of the window or the chunk at depth 0; codes copied where the two depths store
              alike, as decoding copies them) and seen from the step it arrives until the step it
              moves on; a KIVI key is seen in 16 bits until its group is complete.
Then the layer's arrays are written: the chunk's tokens into the sinks and window (those still in it),
and each arriving rank's codes where it is when the chunk ends (a KIVI group still being filled into
the stage).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.errors import KvjaxError
from kvjax.history import NEVER
from kvjax.stores import after_reading, moved, write_slots
from pallas_kernels.xla_attention import CHUNK_SLOTS, merge_partials, slices

BEFORE = -1  # the step of an event that happened before the chunk


@struct.dataclass
class ChunkRoute:
    """The bookkeeping of a chunk's steps, the same for every layer (set by `begin`)."""

    entered: jax.Array  # int32 [b, n]: tokens that had entered each tier when the chunk began
    arrivals: jax.Array  # int32 [b, n, t]: the step at which the j-th token to enter tier i during the chunk
    #                      entered it (NEVER: fewer entered)
    start: jax.Array  # int32 [b]: the chunk's first position (the tokens held when it began)

    def entry_step(self, tier: int, rank):
        """The step at which `rank` (int32 [b, ...]) of a tier that leaving tokens enter entered it:
        BEFORE the chunk, during it, or NEVER (not by its end)."""
        j = rank - self.entered[:, tier].reshape((-1,) + (1,) * (rank.ndim - 1))
        t = self.arrivals.shape[2]
        during = jnp.take_along_axis(self.arrivals[:, tier], jnp.clip(j, 0, t - 1).reshape(j.shape[0], -1),
                                     axis=1).reshape(j.shape)
        return jnp.where(j < 0, BEFORE, jnp.where(j < t, during, NEVER))


def begin(cache, positions):
    """Routes a chunk: positions int32 [b, t] (consecutive from each row's length, -1 on padding) -> the
    cache with the chunk's ChunkRoute."""
    W, t = cache.layout.window, positions.shape[1]
    if t > W and cache.uses_features:
        raise KvjaxError(f"a policy that reads token features takes at most W = {W} tokens per sequence a step "
                         f"(the features of a token leaving the window are recorded after its chunk), got {t}")
    route, entered = _route(cache, positions, cache.entered, cache.lengths)
    return cache.replace(entered=entered, route=route)


def max_tokens(layout, uses_features: bool) -> int | None:
    """Most tokens one step may bring to a tiered cache of this layout (None: any): W for a policy that
    reads token features (it decides on a token leaving the window from features recorded after the
    chunk the token came in) and for layers in several store segments (no shipped policy has more than
    one; each segment's scan would hold a chunk's whole work)."""
    return layout.window if uses_features or len(layout.store_segments) > 1 else None


def _route(cache, positions, entered, start):
    """The ChunkRoute of a chunk at positions [b, t], given the tokens that had entered each tier before
    it, entered [b, n], and its first position start [b] -> (route, the tokens that had entered each
    tier after it)."""
    def step(entered, p):
        route, entered = cache.route_step(p, entered)
        return entered, (route.tier, route.rank)

    after, (tier, rank) = jax.lax.scan(step, entered, positions.T)
    tier, rank = tier.T, rank.T  # [b, t]
    n, (b, t) = len(cache.layout.tiers), positions.shape
    first = jnp.take_along_axis(entered, jnp.clip(tier, 0, max(n - 1, 0)), axis=1)  # [b, t]
    arrivals = jnp.full((b, n, t), NEVER, jnp.int32).at[
        jnp.arange(b)[:, None], jnp.where(tier >= 0, tier, n), rank - first].set(positions, mode="drop")
    return ChunkRoute(entered, arrivals, start), after


def attend(cache, layer, q, k, v, positions):
    """One layer of a chunk (routed by cache.route): q [b, t, n, h], this chunk's k, v [b, t, k, h] at
    positions [b, t] -> (out [b, t, n, h], cache)."""
    lay, li = cache.layout, layer.index
    seg, local = layer.segment, layer.index - lay.store_segments[layer.segment][0]
    b, t = positions.shape
    k16, v16 = (x.astype(cache.window_k.dtype).swapaxes(1, 2) for x in (k, v))  # [b, k, t, h], as stored
    step = positions[:, :, None]  # [b, t, 1]: the step of each query
    stores = [(tier.keys[seg].layer(local), tier.values[seg].layer(local)) for tier in cache.tiers]  # this layer's
    banks, arrivals = [_sixteen_bit(cache, li, k16, v16, positions)], []
    for head in lay.heads:
        chain = lay.chain(head)
        for d, i in enumerate(chain):
            if not lay.tiers[i].slots:
                break
            banks.append(_as_stored(cache, stores[i], i, chain, d, step))
            arrivals.append(Arrivals.of(cache, li, stores, chain, d, arrivals[-1] if d else None, k16, v16))
            banks += arrivals[-1].banks(step)
    banks = [(read, mask & (step >= 0), block) for read, mask, block in banks]
    out = merge_partials([cache.backend.chunk_partials(q, banks, kv_heads=k.shape[2])])  # [b, t, n, h]

    read = out.reshape(-1)[0]  # every write below comes after the reads the attention made
    stores = [list(pair) for pair in stores]
    for arriving in arrivals:
        stores[arriving.tier] = arriving.store(*stores[arriving.tier], read)
    last = positions.max(axis=1, keepdims=True)  # [b, 1]: the chunk's last step
    sink_slot = lay.sink_slot(positions)
    window_slot = jnp.where(lay.has_left(positions, last), lay.window_slots, lay.window_slot(positions))  # gone by then
    put = lambda full, slot, x: write_slots(full, slot, after_reading(read, x.swapaxes(1, 2)), li)
    return out.astype(q.dtype), cache.replace(
        sink_k=put(cache.sink_k, sink_slot, k16), sink_v=put(cache.sink_v, sink_slot, v16),
        window_k=put(cache.window_k, window_slot, k16), window_v=put(cache.window_v, window_slot, v16),
        tiers=tuple(tier.with_segment(seg, keys, values) for tier, (keys, values) in zip(cache.tiers, stores)))


def _sixteen_bit(cache, li, k16, v16, positions):
    """The sinks, the window as the chunk found it, and the chunk's tokens: one bank of 16-bit K/V."""
    lay, start = cache.layout, cache.route.start  # the chunk's first position
    S, W = lay.sinks, lay.window
    step = positions[:, :, None]
    sink = jnp.arange(lay.sink_slots)[None, :]  # a sink's slot is its position
    last = (start - 1)[:, None]
    in_window = last - (last - S - jnp.arange(lay.window_slots)[None, :]) % W  # [b, W']: the position held
    chunk = positions[:, None, :]  # [b, 1, t]
    mask = jnp.concatenate([
        jnp.broadcast_to((sink < jnp.minimum(start, S)[:, None])[:, None], (*positions.shape, lay.sink_slots)),
        (in_window >= S)[:, None] & ~lay.has_left(in_window[:, None], step),  # until it leaves the window
        (chunk >= 0) & (chunk <= step) & ~lay.has_left(chunk, step)], axis=2)
    keys = jnp.concatenate([cache.sink_k[li], cache.window_k[li], k16], axis=2)
    values = jnp.concatenate([cache.sink_v[li], cache.window_v[li], v16], axis=2)
    return slices(keys, values), mask, CHUNK_SLOTS


def _as_stored(cache, stores, tier: int, chain, d: int, step):
    """Tier `tier` (depth d of `chain`) as the chunk found it: its valid slots (at depth 0 without the
    KIVI group being filled, which arrives again), each seen until its group moves on."""
    lay, g, route = cache.layout, cache.layout.group_size, cache.route
    keys, values = stores
    entered = route.entered[:, tier]
    rank, valid = lay.rank_at(tier, entered), lay.valid_slots(tier, entered)  # [b, c]
    if d == 0:
        valid &= rank < (entered // g * g)[:, None]
    leaves = route.entry_step(chain[0], rank // g * g + lay.through(chain, d)) if d + 1 < len(chain) else NEVER
    mask = valid[:, None] & (step < jnp.broadcast_to(leaves, rank.shape)[:, None])  # [b, t, c]
    read = lambda start, size: tuple(s.decode(s.take(jnp.broadcast_to(jnp.arange(start, start + size), (
        entered.shape[0], size)))) for s in (keys, values))
    return read, mask, max(CHUNK_SLOTS // g, 1) * g  # blocks of whole key groups


@dataclasses.dataclass(frozen=True)
class Arrivals:
    """The ranks that reach depth d of a chain during a chunk, in one layer: a run of N ranks from
    `base` (whole groups), their codes at that depth, and the steps at which each arrives, has its
    KIVI key quantized (its group complete) and leaves."""

    base: jax.Array  # int32 [b]: the first rank (a multiple of G)
    exists: jax.Array  # bool [b, N]: the rank arrives during the chunk (or, at depth 0, was being staged)
    arrive: jax.Array  # int32 [b, N]: the step it arrives (BEFORE: a staged KIVI key)
    ready: jax.Array  # int32 [b, N]: the step its key is read quantized (NEVER: not in this chunk)
    leave: jax.Array  # int32 [b, N]: the step it moves on (NEVER: not in this chunk)
    raw_keys: dict  # the keys' codes at this depth, as the tier's store keeps them ([b, k, N, ...])
    raw_values: dict
    keys16: jax.Array | None  # float [b, k, N, h]: 16-bit keys of a KIVI head tier (None elsewhere)
    forms: tuple  # float32 keys, values [b, k, N, h] as read back
    slots: jax.Array  # int32 [b, N]: each rank's slot in the tier
    tier: int

    @classmethod
    def of(cls, cache, li, stores, chain, d: int, below, k16, v16):
        """The arrivals at depth d of `chain` in layer li of a chunk whose own K/V are k16, v16 [b, k, t, h]
        (`below`: depth d - 1's)."""
        lay, route, g = cache.layout, cache.route, cache.layout.group_size
        head, tier = chain[0], chain[d]
        keys, values = stores[tier]
        first, t = route.entered[:, head], k16.shape[2]  # [b]
        if d == 0:  # the tokens entering, after the KIVI group being filled when the chunk began
            base, n = first // g * g, g * -(-(g - 1 + t) // g)
        else:  # the groups of whose ranks the one that pushes them to depth d enters during the chunk
            base, n = -(-(first - lay.through(chain, d - 1)) // g) * g, g * -(-t // g)
        rank = base[:, None] + jnp.arange(n)  # [b, N]
        group = rank // g * g
        arrive = route.entry_step(head, rank if d == 0 else group + lay.through(chain, d - 1))
        leave = route.entry_step(head, group + lay.through(chain, d)) if d + 1 < len(chain) else \
            jnp.full_like(rank, NEVER)
        exists = (rank >= 0) & (arrive != NEVER)
        slots = lay.tiers[tier].slot_of(rank)
        keys16 = None
        if d == 0:  # from the window or the chunk (and, for what entered before the chunk, the tier as it is)
            entering = rank >= first[:, None]
            left = lay.leaving(arrive)  # [b, N]: the position of the token
            window_slot = jnp.minimum(lay.window_slot(left), lay.window_slots - 1)
            in_chunk = (left >= route.start[:, None])[:, None, :, None]  # it came with this chunk
            at = jnp.clip(left - route.start[:, None], 0, t - 1)[:, None, :, None]
            k_new, v_new = (jnp.where(in_chunk, jnp.take_along_axis(x16, at, axis=2),
                                      jnp.take_along_axis(full[li], window_slot[:, None, :, None], axis=2))
                            for x16, full in ((k16, cache.window_k), (v16, cache.window_v)))  # [b, k, N, h]
            staged = keys.staged
            if staged:  # a KIVI key waits in the 16-bit stage until its group is complete
                stage = jnp.take_along_axis(keys.get("stage"), (rank % g)[:, None, :, None], axis=2)
                keys16 = jnp.where(entering[:, None, :, None], k_new, stage)
                raw_keys = keys.encode(keys16, cache.backend)
            else:
                raw_keys = keys.select(entering, keys.encode(k_new, cache.backend), keys.take(slots))
            raw_values = values.select(entering, values.encode(v_new, cache.backend), values.take(slots))
            ready = route.entry_step(head, group + g - 1) if staged else arrive
        else:  # from the depth before: arrivals there during the chunk, or its tier as the chunk found it
            ready = arrive
            lower = rank >= below.base[:, None]
            at = jnp.clip(rank - below.base[:, None], 0, below.exists.shape[1] - 1)
            src = stores[chain[d - 1]]
            src_slots = lay.tiers[chain[d - 1]].slot_of(rank)
            raw_keys, raw_values = (
                moved(store, source, source.select(lower, source.gather(raw, at), source.take(src_slots)),
                      cache.backend)
                for store, source, raw in ((keys, src[0], below.raw_keys), (values, src[1], below.raw_values)))
        forms = (keys.decode(raw_keys), values.decode(raw_values))
        return cls(base, exists, arrive, ready, leave, raw_keys, raw_values, keys16, forms, slots, tier)

    def banks(self, step):
        """(read, mask [b, t, N], block) of these ranks for queries at `step` [b, t, 1]."""
        seen = lambda since, until: (self.exists[:, None] & (since[:, None] <= step) & (step < until[:, None]))
        quantized = (slices(*self.forms), seen(jnp.maximum(self.arrive, self.ready), self.leave), CHUNK_SLOTS)
        if self.keys16 is None:
            return [quantized]
        return [quantized, (slices(self.keys16, self.forms[1]), seen(self.arrive, jnp.minimum(self.ready, self.leave)),
                            CHUNK_SLOTS)]

    def store(self, keys, values, read):
        """The tier's stores of this layer with these ranks written where they are at the chunk's end
        (after `read`, a scalar of what the chunk's attention read); a KIVI group still being filled
        goes to the stage."""
        here = self.exists & (self.leave == NEVER)
        later = lambda raw: jax.tree_util.tree_map(lambda x: after_reading(read, x), raw)
        values = values.put(self.slots, later(self.raw_values), here)
        if self.keys16 is None:
            return keys.put(self.slots, later(self.raw_keys), here), values
        complete = self.ready != NEVER
        keys = keys.put(self.slots, later(self.raw_keys), here & complete)
        return keys.put_stage(self.slots, after_reading(read, self.keys16), here & ~complete), values

