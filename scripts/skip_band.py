"""Experiment: a band policy whose controller lets some tokens skip the 4-bit band.

    python scripts/skip_band.py --text wikitext2 --budget 3.0 --skip-shares 0,0.1,0.25 --chooser controller

`band@B` keeps every left token at 4 bits in a ring of n4 slots and demotes the ring's
oldest group to 2 bits when it is full. Here a share of the tokens that leave the window
within the segment goes straight to 2 bits instead (their keys in groups of G of their own),
so the ring covers older tokens at the same memory. Which tokens skip, ranked over the
segment: the lowest 4-bit minus 2-bit logit of the shipped controller for the budget, from
FP16 features (`controller`); the least FP16 attention received from the W queries while in
the window (`window-attention`, known when the token leaves); the least FP16 attention
received from all later queries (`later-attention`, an oracle); or random (`random`).
Exact teacher-forced scoring as `kvjax.teacher_forced` (skip share 0 reproduces band@B).
An experiment, not a cache policy (README, "Per-token choice on top of the band").
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from experiments import controller_margin, nll_through
from eval.perplexity import read_text
from kvjax.attention import MASK_VALUE, grouped_scores
from kvjax.cache import DenseCache
from kvjax.loading import load_model
from kvjax.model import forward_with_stats
from kvjax.policies import parse_policy
from kvjax.teacher_forced import TeacherForcedCache, _roundtrip


@struct.dataclass
class SkipBandCache(TeacherForcedCache):
    """widths: 4 for tokens that enter the band, 2 for tokens that skip it."""

    def _band_parts(self, keys, values, left, qp):
        """As TeacherForcedCache's, but a group is demoted when the member that starts the group
        n4/G later leaves the window (members are no longer every left token), plus the 2-bit
        parts of the tokens that skip."""
        spec, g = self.spec, self.spec.group_size
        b, T = self.widths.shape
        members = self.widths == 4
        k4, v4, ready4 = _roundtrip(spec, keys, values, members, 4)
        k2, v2, _ = _roundtrip(spec, k4, v4, members, 2)
        rank = jnp.cumsum(members, axis=1) - 1
        first_of_next = (rank // g + self.band_slots // g) * g
        pos_of_rank = jnp.argsort(jnp.where(members, rank, T + jnp.arange(T)), axis=1)  # [b, T]
        n = jnp.sum(members, axis=1, keepdims=True)
        demote_at = jnp.where(first_of_next < n, jnp.take_along_axis(pos_of_rank, jnp.minimum(first_of_next, T - 1),
                                                                     axis=1) + spec.window, jnp.iinfo(jnp.int32).max)
        demoted = members[:, None, :] & (qp >= demote_at[:, None, :])
        key_4bit = left & members[:, None, :] & (ready4[:, None, :] <= qp) & ~demoted
        skipped = self.widths == 2
        ks, vs, ready2 = _roundtrip(spec, keys, values, skipped, 2)
        key_skip = left & skipped[:, None, :] & (ready2[:, None, :] <= qp)
        return [(key_4bit, k4, left & members[:, None, :] & ~demoted, v4), (demoted, k2, demoted, v2),
                (key_skip, ks, left & skipped[:, None, :], vs)]


def attention_received(model, ids, window: int) -> tuple[np.ndarray, np.ndarray]:
    """FP16 attention mass each token receives, summed over layers and query heads: from the
    W queries while it is in the window (known when it leaves), and from all later queries
    (an oracle). Returns (in_window [T], later [T])."""
    T = len(ids)
    tok = jnp.asarray(ids)[None]
    pos = jnp.arange(T)[None]
    cache = DenseCache.init(model.cfg, 1, T)
    _, cache, (_, queries) = jax.jit(forward_with_stats, static_argnums=1, static_argnames="queries")(
        model.params, model.cfg, tok, pos, cache, queries=True)
    j = jnp.arange(T)

    def layer(x):
        q, keys = x
        scores = grouped_scores(q, keys)  # [1, k, g, T, T]
        probs = jax.nn.softmax(jnp.where((j[None, :] <= j[:, None])[None, None, None], scores, MASK_VALUE), -1)
        near = (j[:, None] - j[None, :] < window)
        return jnp.stack([jnp.where(near, probs, 0).sum((0, 1, 2, 3)), jnp.where(near, 0, probs).sum((0, 1, 2, 3))])

    mass = np.asarray(jax.lax.map(layer, (queries, cache.k)).sum(0))
    return mass[0], mass[1]


def skip_scores(model, ids, budget: float, chooser: str, seed: int, window: int) -> np.ndarray:
    """float [T]: lower skips first."""
    if chooser == "random":
        return np.random.default_rng(seed).random(len(ids))
    if chooser in ("window-attention", "later-attention"):
        return attention_received(model, ids, window)[chooser == "later-attention"]
    return controller_margin(model, ids, budget)


def segment_nll(model, ids, spec, widths, band_slots):
    """Next-token NLL [T-1] of one segment whose left tokens have `widths` [T] (4: band, 2: skip)."""
    cache = SkipBandCache.init(spec, model.cfg, 1, len(ids), jnp.float32, band_slots)
    return nll_through(model, ids, cache.replace(widths=jnp.asarray(widths)[None]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--budget", type=float, default=3.0)
    p.add_argument("--skip-shares", default="0,0.1")
    p.add_argument("--chooser", default="controller",
                   choices=("controller", "random", "window-attention", "later-attention"))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--segments", type=int, default=2)
    args = p.parse_args()
    model = load_model(None)
    spec = parse_policy(f"band@{args.budget:g}")
    band_slots = spec.capacities(args.context)[4]
    ids = np.asarray(model.tokenizer.encode(read_text(args.text)), np.int32)
    segs = [ids[s * args.context:(s + 1) * args.context] for s in range(args.segments)]
    scores = [skip_scores(model, seg, args.budget, args.chooser, s, spec.window) for s, seg in enumerate(segs)]
    for share in (float(x) for x in args.skip_shares.split(",")):
        nll = []
        for seg, sc in zip(segs, scores):
            T = len(seg)
            j = np.arange(T)
            widths = np.where(j >= spec.sinks, 4, -1).astype(np.int32)
            leaves = (j >= spec.sinks) & (j < T - spec.window)  # the tokens whose width is ever read
            widths[np.argsort(np.where(leaves, sc, np.inf))[:round(share * leaves.sum())]] = 2
            nll.append(segment_nll(model, seg, spec, widths, band_slots))
        print(f"{args.text} @{args.context} x{args.segments} band@{args.budget:g} ({band_slots} slots) "
              f"skip {share:g} by {args.chooser}: perplexity {np.exp(np.concatenate(nll).mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
