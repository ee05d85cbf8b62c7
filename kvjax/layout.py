"""The static shape of a quantized cache: its tiers, their widths per layer, and the token rules.

A policy (kvjax.policies) describes a cache as a `Layout`; the step-by-step cache (kvjax.tiered),
the prompt fill and the exact teacher-forced scorer (kvjax.teacher_forced) all read it, so the
rules below are written once:

  * Token j is a sink if j < S; else it is in the 16-bit window until W newer tokens have arrived
    (`has_left`). Its window slot is (j - S) % W.
  * A token that leaves enters one tier (the policy's `entry`) or is evicted. Its *rank* is the
    number of tokens that entered that tier before it; its slot is `Tier.slot_of(rank)`.
  * KIVI keys are quantized per channel in groups of G consecutive ranks: a key waits in 16 bits
    (the tier's stage) until its group is full. Values are quantized at once, per token.
  * A tier with `demote_to` is a ring: when a new group starts and the ring is full, its oldest
    group moves, whole, to the next tier of its chain (re-encoded at that tier's widths, or copied
    if they are the same). Groups keep their order, so a token keeps its rank down the chain, and
    the group of rank r leaves depth d of the chain when rank r // G * G + `Layout.through(chain, d)`
    enters the chain's first tier.

Widths may differ by layer and between keys and values. Layers with the same widths in every
tier form a *width segment* (`segments`), in which every width is static: the teacher-forced
scorer runs one scan per width segment. The step-by-step cache needs less: layers whose tiers store
keys and values in the same *kind* (16 bits, or codes) form a *store segment* (`store_segments`;
one for every policy whose widths are all codes), and within it a tier side whose widths differ by
layer keeps one store per width (kvjax.stores.ByWidth), so that one scan runs every layer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from kvjax.errors import KvjaxError
from kvjax.rotation import NONE, Rotation
from pallas_kernels.quant import VALID_BITS

DEFAULT_SINKS = 4  # S, for the policies that keep sinks
DEFAULT_WINDOW = 128  # W (KIVI's residual R)
DEFAULT_GROUP = 32  # G
EVICTED = -1  # entry of a token that was dropped
NO_ENTRY = -2  # not left (yet), a sink, or padding
CODE_WIDTHS = VALID_BITS  # the widths stored as packed codes: what the codecs pack (pallas_kernels.quant)
WIDTHS = CODE_WIDTHS + (16,)  # every width a tier stores at (16: as is, in the cache's 16-bit dtype), in this
# order: the controller's logits, the mixed policies' tiers and the allocation trainer's choices follow it


def has_left(positions, query_positions, sinks: int, window: int):
    """Whether tokens at `positions` have left the 16-bit window as seen from queries at
    `query_positions` (numpy or jnp, broadcast): not a sink, and at least W tokens older."""
    return (positions >= sinks) & (query_positions - positions >= window)


@dataclasses.dataclass(frozen=True)
class Tier:
    """Slots for left tokens, with the widths its keys and values are stored at, per layer."""

    label: str  # for the stats line: "2-bit", "4-bit", ...
    slots: int
    key_bits: tuple[int, ...]  # per layer, one of WIDTHS
    value_bits: tuple[int, ...]
    symmetric: bool = False  # per-token symmetric codes (keys and values) instead of KIVI's
    demote_to: int | None = None  # a ring: its oldest group moves to this tier when a new one needs room

    def __post_init__(self):
        for bits in self.key_bits + self.value_bits:
            if bits not in WIDTHS:
                raise KvjaxError(f"tier {self.label}: width {bits} is not one of {WIDTHS}")
        if len(self.key_bits) != len(self.value_bits):
            raise KvjaxError(f"tier {self.label}: {len(self.key_bits)} key widths, {len(self.value_bits)} value widths")

    @property
    def ring(self) -> bool:
        return self.demote_to is not None

    def slot_of(self, rank):
        """Slot of the token (or group start) with this rank (jnp or int)."""
        return rank % max(self.slots, 1) if self.ring else rank

    def bits_of(self, layer: int) -> tuple[int, int]:
        return self.key_bits[layer], self.value_bits[layer]

    def mean_bits(self) -> float:
        """Average over layers and over keys and values."""
        return (sum(self.key_bits) + sum(self.value_bits)) / (2 * len(self.key_bits))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything static about a quantized cache of one policy, model and capacity."""

    sinks: int  # S
    window: int  # W
    group_size: int  # G
    tiers: tuple[Tier, ...]
    num_layers: int
    sink_slots: int  # slots actually allocated: what can reach them at this capacity
    window_slots: int
    rotation: Rotation = NONE  # keys and/or values stored rotated (kvjax.rotation; the model applies it)

    def __post_init__(self):
        for i, t in enumerate(self.tiers):
            if len(t.key_bits) != self.num_layers:
                raise KvjaxError(f"tier {t.label}: widths for {len(t.key_bits)} layers, the model has {self.num_layers}")
            if t.ring and (t.slots % self.group_size or not 0 <= t.demote_to < len(self.tiers) or t.demote_to == i):
                raise KvjaxError(f"tier {t.label}: a ring needs whole groups and another tier to demote to")
        fed = [t.demote_to for t in self.tiers if t.ring]
        if len(set(fed)) != len(fed) or not self.heads and self.tiers:
            raise KvjaxError("each tier is fed by at most one ring, and rings do not form a cycle")

    @property
    def heads(self) -> tuple[int, ...]:
        """Tiers that leaving tokens enter (the others are only reached by demotion)."""
        fed = {t.demote_to for t in self.tiers if t.ring}
        return tuple(i for i in range(len(self.tiers)) if i not in fed)

    def chain(self, head: int) -> tuple[int, ...]:
        """The tiers a token entering `head` passes through, in order."""
        out = [head]
        while self.tiers[out[-1]].ring:
            out.append(self.tiers[out[-1]].demote_to)
        return tuple(out)

    def through(self, chain: tuple[int, ...], depth: int) -> int:
        """Slots of the chain up to and including `depth`: a group leaves that depth when the rank this
        many places after its start enters the chain."""
        return sum(self.tiers[i].slots for i in chain[:depth + 1])

    @property
    def caps(self) -> tuple[int, ...]:
        return tuple(t.slots for t in self.tiers)

    @property
    def average_bits(self) -> float:
        """Mean width of the left tokens when every slot of every tier holds one, as in a full cache whose
        tokens all pass through one chain of tiers: the tiers' `mean_bits` weighted by their slots (0
        without tiers: every left token is evicted; 16 while no slot can be reached)."""
        slots = sum(self.caps)
        if not self.tiers:
            return 0.0
        if not slots:
            return 16.0
        return sum(t.slots * t.mean_bits() for t in self.tiers) / slots

    @functools.cached_property  # asked for every layer and tier while tracing
    def segments(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) of the runs of layers whose widths are the same in every tier."""
        sig = [tuple(t.bits_of(layer) for t in self.tiers) for layer in range(self.num_layers)]
        starts = [0] + [i for i in range(1, self.num_layers) if sig[i] != sig[i - 1]]
        return tuple(zip(starts, starts[1:] + [self.num_layers]))

    @functools.cached_property
    def store_segments(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) of the runs of layers whose tiers store keys and values in the same kind, 16
        bits or codes, in every tier (widths may differ: kvjax.stores.ByWidth)."""
        kind = [tuple((k == 16, v == 16) for k, v in (t.bits_of(layer) for t in self.tiers))
                for layer in range(self.num_layers)]
        starts = [0] + [i for i in range(1, self.num_layers) if kind[i] != kind[i - 1]]
        return tuple(zip(starts, starts[1:] + [self.num_layers]))

    def store_segment_of(self, segment: int) -> int:
        """The store segment that width segment `segment` lies in (a width segment never spans two)."""
        start = self.segments[segment][0]
        return next(i for i, (a, b) in enumerate(self.store_segments) if a <= start < b)

    def segment_bits(self, segment: int, tier: int) -> tuple[int, int]:
        return self.tiers[tier].bits_of(self.segments[segment][0])

    def has_left(self, positions, query_positions):
        return has_left(positions, query_positions, self.sinks, self.window)

    def leaving(self, positions):
        """The position of the token that leaves the window when the one at `positions` arrives (jnp;
        -1: none, or padding)."""
        return jnp.where(self.has_left(positions - self.window, positions), positions - self.window, -1)

    def sink_slot(self, positions):
        """The sink slot of tokens at `positions` (jnp): the position, or sink_slots (none) past S or for padding."""
        return jnp.where((positions >= 0) & (positions < self.sinks), positions, self.sink_slots)

    def window_slot(self, positions):
        """The window slot of tokens at `positions` (jnp): (p - S) % W, or window_slots (none) for a
        sink or padding."""
        return jnp.where(positions >= self.sinks, (positions - self.sinks) % self.window, self.window_slots)

    def keeps_key_stage(self, tier: int, key_bits: int) -> bool:
        """Whether a tier's keys wait in a 16-bit stage until their group of G is complete: KIVI keys
        (codes, not symmetric) of a tier that leaving tokens enter; a tier reached only by demotion
        receives whole groups."""
        return key_bits < 16 and not self.tiers[tier].symmetric and tier in self.heads

    def held(self, tier: int, entered):
        """Tokens a tier holds, given how many entered it (jnp [...]): a ring has moved its oldest on."""
        t = self.tiers[tier]
        if not t.ring:
            return entered
        return entered - self.evicted_below(tier, entered)

    def evicted_below(self, tier: int, entered):
        """Ranks below this have left a ring that `entered` tokens entered (0 for other tiers)."""
        t, g = self.tiers[tier], self.group_size
        if not t.ring:
            return jnp.zeros_like(entered)
        return jnp.maximum(-(-entered // g) * g - t.slots, 0)

    def rank_at(self, tier: int, entered):
        """int32 [b, c]: the rank of the token in each slot (in a ring, the latest rank that used the slot),
        given entered [b]; `valid_slots` says which slots hold one."""
        t = self.tiers[tier]
        slot = jnp.arange(t.slots)[None, :]
        e = entered[:, None]
        return e - 1 - (e - 1 - slot) % t.slots if t.ring else jnp.broadcast_to(slot, (e.shape[0], t.slots))

    def valid_slots(self, tier: int, entered):
        """bool [b, c]: slots holding a token, given entered [b] (no positions are stored)."""
        rank, e = self.rank_at(tier, entered), entered[:, None]
        if not self.tiers[tier].ring:
            return rank < e
        return (e > 0) & (rank >= self.evicted_below(tier, e))

    def stage_start(self, tier: int, entered):
        """[b]: slot of the first rank of the group being filled (KIVI keys wait in the stage)."""
        return self.tiers[tier].slot_of(entered // self.group_size * self.group_size)
