"""Widths by age instead of by token: perplexity when every left token is stored at 4 bits for
its first `band` steps after leaving the window and then re-quantized to 2 bits.

    python scripts/age_band.py --text wikitext2 --budgets 3.0,2.5
    python scripts/age_band.py --text wikitext2 --budgets 3.0 --band-bits 16   # a longer 16-bit window
    python scripts/age_band.py --text wikitext2 --budgets 3.0 --pin-share 0.25  # controller-chosen pins

At the cache's full capacity (the segment length) the 4-bit band holds `band` tokens and the
rest are 2-bit, so `band = (budget - 2) / 2 x left tokens` gives the budget's average bits, the
same memory as `mixed@budget` with its tiers full. Sinks (S) and the window (W) stay 16-bit, as in
every mixed policy; keys are quantized per channel in groups of G consecutive tokens once the
group's last token has left the window, and demoted once its first token is `band` steps past
the window; values per token. The 2-bit codes are made from the 4-bit values (what a cache
that demotes in place would hold). `--band-bits 16` makes the band a longer 16-bit window
(KIVI-2 with a larger residual at the same memory); `--pin-share` gives part of the 4-bit slots
to the tokens the shipped controller most prefers at 4 bits, which are never demoted.

An experiment on the exact teacher-forced path, not a cache policy yet: it tells whether a
schedule over age can reach what per-token widths cannot (README, "How far per-token widths
can go"). Check: a band of every left token (budget 4) reproduces mixed-learned@4, which keeps
every left token at 4 bits (19.055 vs 19.06 on WikiText-2).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from experiments import controller_margin, nll_through
from eval.perplexity import read_text
from kvjax import codecs
from kvjax.attention import MASK_VALUE, causal_mask, grouped_output, grouped_scores
from kvjax.cache import write_by_position
from kvjax.loading import load_model
from kvjax.policies import PolicySpec, parse_policy


def _key_groups(keys, bits: int, spec: PolicySpec):
    """Keys [b, k, T, h] quantized per channel in groups of G consecutive tokens from S on."""
    S, G = spec.sinks, spec.group_size
    rest = keys[:, :, S:]
    pad = -rest.shape[2] % G
    rest = jnp.pad(rest, ((0, 0), (0, 0), (0, pad), (0, 0)))
    deq = codecs.decode_key_groups(*codecs.encode_key_groups(rest, bits, G, keys.dtype), bits, G, keys.dtype)
    return jnp.concatenate([keys[:, :, :S], deq[:, :, :rest.shape[2] - pad]], axis=2)


def _values(values, bits: int, spec: PolicySpec):
    G = spec.group_size
    return codecs.decode_values(*codecs.encode_values(values, bits, G, values.dtype), bits, G, values.dtype)


@struct.dataclass
class AgeBandCache:
    """All tokens' 16-bit K/V; attention reads each token at 16, 4 or 2 bits by its age."""

    k: jax.Array  # [l, b, k, T, h]
    v: jax.Array  # [l, b, k, T, h]
    spec: PolicySpec = struct.field(pytree_node=False)
    band: int = struct.field(pytree_node=False)
    band_bits: int = struct.field(pytree_node=False)  # 4, or 16 (the band is a longer window)
    pinned: jax.Array | None = None  # bool [b, T]: left tokens kept at band_bits for good

    def begin(self, positions):
        return self

    def update(self, layer, k, v, positions):
        keys, values = write_by_position(self.k, self.v, layer, k, v, positions)
        return self.replace(k=keys, v=values)

    def advance(self, positions):
        return self

    def attend(self, layer, q, positions):
        """q [b, t, n, h] at `positions` over all tokens, each at its width for that query's age."""
        spec, W, S, G = self.spec, self.spec.window, self.spec.sinks, self.spec.group_size
        keys, values = self.k[layer], self.v[layer]  # [b, k, T, h]
        b, _, T, _ = keys.shape
        j = jnp.arange(T)
        qp = positions[:, :, None]  # [b, t, 1]
        left = spec.has_left(j, qp)  # [b, t, T]
        first = S + (j - S) // G * G  # the first and last token of j's key group
        last = first + G - 1
        key_quantized = left & (qp >= last + W)
        key_demoted = key_quantized & (qp - first >= W + self.band)
        value_demoted = left & (qp - j >= W + self.band)
        if self.pinned is not None:
            key_demoted &= ~self.pinned[:, None, :]
            value_demoted &= ~self.pinned[:, None, :]
        k4 = _key_groups(keys, 4, spec) if self.band_bits == 4 else keys
        k2 = _key_groups(k4, 2, spec)
        v4 = _values(values, 4, spec) if self.band_bits == 4 else values
        v2 = _values(v4, 2, spec)
        scores = jnp.where(key_demoted[:, None, None], grouped_scores(q, k2),
                           jnp.where(key_quantized[:, None, None], grouped_scores(q, k4), grouped_scores(q, keys)))
        visible = causal_mask(positions, jnp.broadcast_to(j, (b, T)))
        probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, MASK_VALUE), axis=-1)
        at2 = value_demoted[:, None, None].astype(probs.dtype)
        at4 = (left & ~value_demoted)[:, None, None].astype(probs.dtype)
        out = (grouped_output(probs * at2, v2, jnp.float32) + grouped_output(probs * at4, v4, jnp.float32)
               + grouped_output(probs * (1.0 - at2 - at4), values, jnp.float32))
        return out.astype(q.dtype)


def controller_pins(model, ids, spec: PolicySpec, budget: float, pins: int) -> np.ndarray:
    """bool [T]: the `pins` left tokens with the largest 4-bit minus 2-bit logit of the shipped
    controller for `budget`, from FP16 features (an oracle over the segment's ranking: a decode
    policy would pin by a calibrated threshold)."""
    score = controller_margin(model, ids, budget)
    T = len(ids)
    score[~spec.has_left(np.arange(T), T - 1)] = -np.inf
    pinned = np.zeros(T, bool)
    pinned[np.argsort(-score)[:pins]] = True
    return pinned


def segment_nll(model, ids, spec: PolicySpec, band: int, band_bits: int = 4, pinned=None) -> np.ndarray:
    """Next-token NLL [T-1] of one segment with a band of `band` tokens at `band_bits` (4 or 16)
    and optional `pinned` tokens (bool [T]) that are never demoted."""
    shape = (model.cfg.num_layers, 1, model.cfg.num_kv_heads, len(ids), model.cfg.head_dim)
    cache = AgeBandCache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), spec, band, band_bits,
                         None if pinned is None else jnp.asarray(pinned)[None])
    return nll_through(model, ids, cache)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--budgets", default="3.0", help="comma-separated average bits at full capacity")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--band-bits", type=int, default=4, choices=(4, 16),
                   help="16: the band keeps 16 bits (a longer window) and is shorter at the same memory")
    p.add_argument("--pin-share", type=float, default=0.0,
                   help="share of the 4-bit slots given to the tokens the shipped controller most "
                        "prefers at 4 bits, never demoted; the band gets the rest")
    args = p.parse_args()
    model = load_model(None)
    spec = parse_policy("mixed@3")  # W, S, G as every mixed policy
    ids = np.asarray(model.tokenizer.encode(read_text(args.text)), np.int32)
    left_at_capacity = args.context - spec.sinks - spec.window
    for budget in (float(b) for b in args.budgets.split(",")):
        slots = round((budget - 2.0) / (args.band_bits - 2.0) * left_at_capacity)
        pins = round(args.pin_share * slots)
        band = slots - pins
        nll = []
        for s in range(args.segments):
            seg = ids[s * args.context:(s + 1) * args.context]
            pinned = controller_pins(model, seg, spec, budget, pins) if pins else None
            nll.append(segment_nll(model, seg, spec, band, args.band_bits, pinned))
        print(f"{args.text} @{args.context} x{args.segments} budget {budget:g} ({args.band_bits}-bit band "
              f"{band} tokens, {pins} pinned): "
              f"perplexity {np.exp(np.concatenate(nll).mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
