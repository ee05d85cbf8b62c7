"""How good can per-token widths be at a budget? Perplexity with widths chosen by an oracle that
reads the scored segment's own FP16 trace target (train_controller/traces.py), at each of `--budgets`.

    python scripts/oracle_widths.py --text wikitext2 --budgets 3.0,3.5

For each 4096-token segment (as in `eval.perplexity`): the FP16 pass gives every token's summed
distortion D_j(w) for w in {2, 4, 8, 16}; the oracle picks w_j = argmin D_j(w) + lam * w with
lam bisected so the left tokens average each budget's bits (all widths), or the same restricted
to {2, 4}. No controller trained on this target can score better on it than this oracle; if the
oracle misses a perplexity bar, the target is what limits (another target might do better). Tier
capacities are not applied (every token gets its oracle width). Prints one line per assignment.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from experiments import nll_through
from eval.perplexity import read_text
from kvjax.loading import load_model
from kvjax.policies import parse_policy
from kvjax.teacher_forced import TeacherForcedCache
from train_controller.traces import trace_chunk

WIDTHS = np.array([2, 4, 8, 16])


def oracle(dist: np.ndarray, left: np.ndarray, budget: float, allowed) -> np.ndarray:
    """dist [T, 4] (per width of WIDTHS), left bool [T] -> widths [T] averaging ~`budget` over left."""
    cost = np.where(np.isin(WIDTHS, allowed)[None], dist, np.inf)
    lo, hi = 0.0, float(dist.max()) + 1.0
    for _ in range(100):  # larger lam -> fewer bits
        lam = (lo + hi) / 2
        widths = WIDTHS[np.argmin(cost + lam * WIDTHS[None], axis=1)]
        lo, hi = (lam, hi) if widths[left].mean() > budget else (lo, lam)
    return WIDTHS[np.argmin(cost + hi * WIDTHS[None], axis=1)]


def nll_with_widths(model, ids, spec, widths):
    """Next-token NLL [T-1] through the exact teacher-forced path with the given widths [T]."""
    cache = TeacherForcedCache.init(spec, model.cfg, 1, len(ids), jnp.float32)
    return nll_through(model, ids, cache.replace(widths=jnp.asarray(widths, jnp.int32)[None]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--budgets", default="3.0", help="comma-separated average bits")
    p.add_argument("--only-all", action="store_true", help="skip the {2, 4} oracle")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--segments", type=int, default=2)
    args = p.parse_args()
    model = load_model(None)
    budgets = [float(b) for b in args.budgets.split(",")]
    spec = parse_policy("mixed@3")  # W, S, G as every mixed policy; the budget only sets the widths here
    ids = np.asarray(model.tokenizer.encode(read_text(args.text)), np.int32)
    runs = {(b, "oracle {2,4,8,16}"): (2, 4, 8, 16) for b in budgets}  # (budget, name) -> allowed widths
    if not args.only_all:
        runs.update({(b, "oracle {2,4}"): (2, 4) for b in budgets})
    nll = {key: [] for key in runs}
    for s in range(args.segments):
        seg = ids[s * args.context:(s + 1) * args.context]
        T = len(seg)
        _, dist, _ = trace_chunk(model.params, jnp.asarray(seg)[None], cfg=model.cfg, window=spec.window,
                                 sinks=spec.sinks, group_size=spec.group_size)
        dist = np.asarray(dist[0])  # [T, 4]: summed over the queries that see each token quantized
        left = spec.has_left(np.arange(T), T - 1)
        for (budget, name), allowed in runs.items():
            widths = oracle(dist, left, budget, allowed)
            widths[:spec.sinks] = -1  # sinks stay 16-bit (UNDECIDED)
            hist = {int(w): round(float(np.mean(widths[left] == w)), 3) for w in WIDTHS}
            print(f"segment {s} budget {budget:g} {name}: average bits {widths[left].mean():.3f} "
                  f"histogram {hist}", flush=True)
            nll[budget, name].append(nll_with_widths(model, seg, spec, widths))
    for (budget, name), parts in nll.items():
        print(f"{args.text} @{args.context} x{args.segments} budget {budget:g} {name}: "
              f"perplexity {np.exp(np.concatenate(parts).mean()):.3f}")


if __name__ == "__main__":
    main()
