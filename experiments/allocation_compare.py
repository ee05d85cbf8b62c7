"""Learned allocations against the baselines at the same bits, on both evaluation texts, in one run.

At each budget B: `learned-alloc@B` (the shipped allocation, or `--alloc-dir`/B.json), `band@B`,
the best K/V split (keys at 4 bits for the newest B-2 of the left tokens, values at 2: K4V2 at 3
bits), and a KVTuner-style greedy allocation over layers (the layer sides whose 2-bit cost is
largest in the sensitivity table, docs/results/sensitivity, at 4 bits; the rest at 2); plus FP16
and uniform KIVI-2. Each row: perplexity, its change from FP16, the paired per-token difference
from the learned allocation with its standard error, the bits read from the cache and the bytes
per token a decode cache allocates.

    python experiments/allocation_compare.py --budgets 2.25,2.5,3 --out docs/results/allocation

Per-token NLL is kept under --out/nll/ (a rerun skips what is there); rows go to --out/compare.jsonl
and a picture of each learned allocation to --out/allocation-B.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.perplexity import kv_bytes_per_token, paired_difference, segment_nll, width_summary
from kvjax.data import read_text
from kvjax import load_model
from eval.report import allocation_plot
from kvjax.allocation import default_allocation, load_allocation
from kvjax.layout import DEFAULT_SINKS
from kvjax.policies import Bands, get_policy


def kv_split(budget: float) -> Bands:
    """Keys at 4 bits for the newest B-2 of the left tokens (all of them at 3 bits), values at 2."""
    if budget >= 3.0:
        return Bands(f"kv-split@{budget:g}", bands=((4, 2),), sinks=DEFAULT_SINKS)
    return Bands(f"kv-split@{budget:g}", bands=((4, 2), (2, 2)), shares=(budget - 2.0,), sinks=DEFAULT_SINKS)


def greedy(budget: float, table: str, num_layers: int) -> Bands:
    """KVTuner-style: the layer sides with the largest measured 2-bit cost at 4 bits, until the budget."""
    rows = {r["policy"]: r["perplexity"] for r in map(json.loads, open(table))}
    units = [(rows[f"L{l}-{s}2"], l, s) for l in range(num_layers) for s in "KV"]
    upgraded = {(l, s) for _, l, s in sorted(units, reverse=True)[:int((budget - 2.0) / 2.0 * len(units) + 1e-9)]}
    keys = tuple(4 if (l, "K") in upgraded else 2 for l in range(num_layers))
    values = tuple(4 if (l, "V") in upgraded else 2 for l in range(num_layers))
    return Bands(f"greedy@{budget:g}", bands=((keys, values),), sinks=DEFAULT_SINKS)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="2.25,2.5,3")
    p.add_argument("--texts", default="wikitext2,sherlock")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--alloc-dir", default=None, help="folder of B.json allocations (default: the shipped ones)")
    p.add_argument("--table", default="docs/results/sensitivity/sensitivity.jsonl", help="the sensitivity table")
    p.add_argument("--only", default=None, help="comma-separated policy names to run (default: all)")
    p.add_argument("--out", default="docs/results/allocation")
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    os.makedirs(os.path.join(args.out, "nll"), exist_ok=True)

    model = load_model()
    L = model.cfg.num_layers
    policies = [get_policy("fp16"), get_policy("kivi2")]
    learned = {}
    for b in budgets:
        given = os.path.join(args.alloc_dir, f"{b:g}.json") if args.alloc_dir else None
        alloc = load_allocation(given) if given else default_allocation(b)
        learned[b] = get_policy(f"learned-alloc@{b:g}", allocation=alloc)
        allocation_plot(alloc, os.path.join(args.out, f"allocation-{b:g}.png"),
                        f"learned-alloc@{b:g}: bits per layer and age band ({alloc.average_bits:.3f} average)")
        policies += [learned[b], get_policy(f"band@{b:g}"), kv_split(b), greedy(b, args.table, L)]
    if args.only:
        keep = set(args.only.split(","))
        policies = [q for q in policies if q.name in keep or q.name == "fp16" or q in learned.values()]

    rows = []
    for text in args.texts.split(","):
        ids = np.asarray(model.tokenizer.encode(read_text(text)), np.int32)
        nll = {}
        for policy in policies:
            path = os.path.join(args.out, "nll", f"{text}-{policy.name}.npz")
            t0 = time.perf_counter()
            if os.path.exists(path):
                saved = np.load(path)
                nll[policy.name], left = saved["nll"], saved["left"]
            else:
                parts = [segment_nll(model.params, model.cfg, ids[s * args.context:(s + 1) * args.context], policy)
                         for s in range(args.segments)]
                nll[policy.name], left = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
                np.savez(path, nll=nll[policy.name], left=left)
            bits, histogram = width_summary(left)
            row = {"text": text, "policy": policy.name, "perplexity": math.exp(nll[policy.name].mean()),
                   "nll": float(nll[policy.name].mean()), "average_bits": bits, "histogram": histogram,
                   "kv_bytes_per_token": kv_bytes_per_token(policy, model.cfg, args.context),
                   "tokens": int(nll[policy.name].size), "context": args.context, "segments": args.segments}
            rows.append(row)
            print(f"{text:<9} {policy.name:<18} ppl {row['perplexity']:7.3f}  bits {bits:5.3f}  "
                  f"{row['kv_bytes_per_token']:6.0f} B/token  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        base = nll["fp16"]
        for row in rows:
            if row["text"] != text:
                continue
            row["vs_fp16_percent"] = 100 * (row["perplexity"] / math.exp(base.mean()) - 1)
            budget = next((b for b in budgets if row["policy"].endswith(f"@{b:g}")), None)
            if budget is not None and row["policy"] != learned[budget].name:
                mean, se = paired_difference(nll[learned[budget].name], nll[row["policy"]])
                row["minus_learned_nats"], row["minus_learned_se"] = mean, se

    with open(os.path.join(args.out, "compare.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| text | policy | bits | B/token | perplexity | vs FP16 | minus learned (nats/token, SE) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        paired = (f"{r['minus_learned_nats']:+.4f} ({r['minus_learned_se']:.4f})" if "minus_learned_nats" in r else "")
        print(f"| {r['text']} | {r['policy']} | {r['average_bits']:.3f} | {r['kv_bytes_per_token']:.0f} | "
              f"{r['perplexity']:.3f} | {r['vs_fp16_percent']:+.2f}% | {paired} |")


if __name__ == "__main__":
    main()
