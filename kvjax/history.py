"""Where each token of a sequence is stored, at every step: a quantized cache's bookkeeping.

The bookkeeping is the same for every layer and uses only integers. `enter` is one step of it:
the step-by-step cache (kvjax.tiered) calls it when a token leaves the window, and `entries`
scans it over a whole sequence for the teacher-forced scorer and the prompt fill. From a token's
entry tier and rank, `History` gives the step at which it reaches each depth of its chain and the
step from which its key is read quantized (the closed forms of kvjax.layout), so that the state
of every token as any query sees it is a comparison of integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.layout import EVICTED, NO_ENTRY, Layout

NEVER = jnp.iinfo(jnp.int32).max


def enter(policy, layout: Layout, entered, leave_pos, features):
    """One leaving token per row: leave_pos [b] (-1 = none), features [b, F], entered [b, n] (tokens that
    entered each tier) -> (tier [b] (or EVICTED / NO_ENTRY), rank [b] in that tier, entered)."""
    tier = policy.entry(leave_pos, features, entered, layout)
    tier = jnp.where(leave_pos >= 0, tier, NO_ENTRY)
    onehot = tier[:, None] == jnp.arange(len(layout.tiers))  # [b, n]; EVICTED and NO_ENTRY match none
    rank = jnp.sum(jnp.where(onehot, entered, 0), axis=1)
    return tier, rank, entered + onehot.astype(jnp.int32)


def entries(policy, layout: Layout, positions, features, entered):
    """`enter` for every token in position order (a token's width is decided from its own step, and
    later tokens are decided after it, as when decoding): positions [b, t] (-1 = padding),
    features [b, t, F] -> (tier [b, t], rank [b, t], entered [b, n])."""

    def step(entered, xs):
        pos, feat = xs
        tier, rank, entered = enter(policy, layout, entered, jnp.where(pos >= layout.sinks, pos, -1), feat)
        return entered, (tier, rank)

    entered, (tier, rank) = jax.lax.scan(step, entered, (positions.T, features.transpose(1, 0, 2)))
    return tier.T, rank.T, entered


@struct.dataclass
class History:
    """Per token j of a sequence [b, T]: where it went and when each later state starts."""

    tier: jax.Array  # int32 [b, T]: the tier it entered (EVICTED, or NO_ENTRY if it never leaves)
    rank: jax.Array  # int32 [b, T]: its rank in that tier
    reach: jax.Array  # int32 [b, D + 1, T]: step from which it is at depth d of its chain (NEVER if not)
    key_ready: jax.Array  # int32 [b, T]: step from which its key is read quantized (whole group)
    order: jax.Array  # int32 [b, n, T']: tokens of each tier by rank (T' = T rounded up to G)
    layout: Layout = struct.field(pytree_node=False)

    @classmethod
    def of(cls, layout: Layout, tier, rank):
        b, T = tier.shape
        g, n = layout.group_size, len(layout.tiers)
        padded = -(-T // g) * g
        j = jnp.arange(T)
        rows = jnp.arange(b)[:, None]
        # order[e, r]: the token of rank r in tier e (members first, then the others in position order,
        # so that groups of members are exactly the tier's groups)
        keys = jnp.where(tier[:, None, :] == jnp.arange(n)[None, :, None], rank[:, None, :], T + j)  # [b, n, T]
        order = jnp.argsort(keys, axis=2)
        order = jnp.concatenate([order, jnp.zeros((b, n, padded - T), order.dtype)], axis=2)
        ranked = jnp.full((b, n, padded), -1, jnp.int32)  # ranked[e, r]: position of the token of rank r in e
        ranked = ranked.at[rows, jnp.maximum(tier, 0), jnp.where(tier >= 0, rank, padded)].set(
            jnp.broadcast_to(j, (b, T)), mode="drop")

        def leave_step(at_rank):  # step at which the token of rank at_rank [b, T] of one's own tier leaves the window
            if not n:
                return jnp.full((b, T), NEVER, jnp.int32)
            pos = ranked[rows, jnp.maximum(tier, 0), jnp.clip(at_rank, 0, padded - 1)]
            return jnp.where((tier >= 0) & (at_rank < padded) & (pos >= 0), pos + layout.window, NEVER)

        group_start = rank // g * g
        depth = max((len(layout.chain(h)) for h in layout.heads), default=1)
        reach = [jnp.where(tier >= 0, j + layout.window, NEVER)]
        for d in range(1, depth + 1):
            step = NEVER
            for h in layout.heads:
                chain = layout.chain(h)
                if d < len(chain):
                    step = jnp.where(tier == h, leave_step(group_start + layout.through(chain, d - 1)), step)
            reach.append(jnp.broadcast_to(step, (b, T)).astype(jnp.int32))
        key_ready = leave_step(group_start + g - 1)
        return cls(tier, rank, jnp.stack(reach, axis=1), key_ready, order, layout)

    @property
    def depth(self) -> int:
        return self.reach.shape[1] - 1

    def at_depth(self, d: int, query):
        """bool [b, t, T]: token j is at depth d of its chain for queries at `query` [b, t, 1]."""
        return (self.reach[:, None, d] <= query) & (query < self.reach[:, None, d + 1])

    def members(self, d: int):
        """[(head, tier at depth d, bool [b, T] tokens of that head)] for the chains that reach depth d."""
        return [(h, self.layout.chain(h)[d], self.tier == h) for h in self.layout.heads
                if d < len(self.layout.chain(h))]

    def evicted(self):
        return self.tier == EVICTED

    def tier_at(self, query):
        """int32 [b, T]: the tier each token is in as a query at `query` ([b] or int) sees it; -1 if none
        (in the window, a sink, evicted, padding)."""
        q = jnp.asarray(query).reshape(-1, 1)
        out = jnp.full(self.tier.shape, -1, jnp.int32)
        for d in range(self.depth):
            here = (self.reach[:, d] <= q) & (q < self.reach[:, d + 1])
            for h, t, member in self.members(d):
                out = jnp.where(here & member, t, out)
        return out
