"""Two bits that hold (issue #32): each option's contribution, and the best policy at each byte budget.

Scores policies on both evaluation texts through the exact teacher-forced path (2 x 4096 tokens, as
`python -m eval.perplexity`) and prints, per text: perplexity, its change from FP16, KV bytes per
token at 4096 tokens; then, for each pair "A>B" given in --pairs, B's mean per-token NLL minus A's
with its paired standard error over 128-token blocks (negative: B is better); then, for each byte
budget, the best policy within it and whether it meets its bar against FP16.

A policy spec is a --kv name, optionally ":G" for another group size (`kivi2+rot:64`).

    python experiments/two_bits.py --out docs/results/two-bits

Per-token NLL is kept under --out/nll/ (a rerun skips what is there); rows go to --out/compare.jsonl
(records as eval.perplexity writes them, for `python -m eval.report --perplexity`), the contrasts to
--out/contrasts.jsonl and the tables to --out/compare.md.
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
from kvjax import load_model
from kvjax.data import read_text
from kvjax.policies import get_policy

POLICIES = ("fp16,kivi2,kivi2+rotk,kivi2+rotv,kivi2+rot,kivi2+rot:64,learned-alloc@2.25,learned-alloc@2.25+rot,"
            "learned-alloc@2.5,learned-alloc@2.5+rot,learned-alloc@2.4+rot,learned-alloc@2.42+rot,learned-alloc@2.92+rot")
PAIRS = ("kivi2>kivi2+rotk,kivi2>kivi2+rotv,kivi2>kivi2+rot,kivi2+rot>kivi2+rot:64,"
         "learned-alloc@2.25>learned-alloc@2.25+rot,learned-alloc@2.5>learned-alloc@2.5+rot,kivi2>learned-alloc@2.4+rot,"
         "learned-alloc@2.4+rot>learned-alloc@2.42+rot,learned-alloc@2.5+rot>learned-alloc@2.92+rot")
# issue #32's bars: (bytes per token at 4096, what it is, the most perplexity may rise over FP16 in %)
BUDGETS = ((4995, "kivi2's bytes", 5.0), (5363, "learned-alloc@2.25's bytes", 2.5),
           (5709, "learned-alloc@2.5's bytes", 1.0))


def policy_of(spec: str):
    name, _, group = spec.partition(":")
    return get_policy(name, group_size=int(group)) if group else get_policy(name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default=POLICIES, help="comma-separated specs (name[:G])")
    p.add_argument("--pairs", default=PAIRS, help="comma-separated A>B contrasts (B minus A)")
    p.add_argument("--texts", default="wikitext2,sherlock")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--out", default="docs/results/two-bits")
    args = p.parse_args()
    specs = [s.strip() for s in args.policies.split(",") if s.strip()]
    pairs = [tuple(pair.split(">")) for pair in args.pairs.split(",") if pair.strip()]
    if "fp16" not in specs or any(a not in specs or b not in specs for a, b in pairs):
        p.error("--policies needs fp16 and both sides of every pair")
    policies = {s: policy_of(s) for s in specs}  # bad names fail here, before the model loads
    os.makedirs(os.path.join(args.out, "nll"), exist_ok=True)
    model = load_model()

    rows, contrasts = [], []
    for text in args.texts.split(","):
        ids = np.asarray(model.tokenizer.encode(read_text(text)), np.int32)
        nll = {}
        for spec, policy in policies.items():
            path = os.path.join(args.out, "nll", f"{text}-{spec.replace(':', '-G')}.npz")
            t0 = time.perf_counter()
            if os.path.exists(path):
                saved = np.load(path)
                nll[spec], left = saved["nll"], saved["left"]
            else:
                parts = [segment_nll(model.params, model.cfg, ids[s * args.context:(s + 1) * args.context], policy)
                         for s in range(args.segments)]
                nll[spec], left = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
                np.savez(path, nll=nll[spec], left=left)
            bits, histogram = width_summary(left)
            row = {"text": text, "policy": spec, "perplexity": math.exp(nll[spec].mean()),
                   "average_bits": bits, "histogram": histogram,
                   "kv_bytes_per_token": kv_bytes_per_token(policy, model.cfg, args.context),
                   "group_size": getattr(policy, "group_size", None), "rotate": getattr(policy, "rotate", "none"),
                   "tokens": int(nll[spec].size), "context": args.context, "segments": args.segments}
            rows.append(row)
            print(f"{text:<9} {spec:<24} ppl {row['perplexity']:7.3f}  {row['kv_bytes_per_token']:6.0f} B/token  "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        base = math.exp(nll["fp16"].mean())
        for row in rows:
            if row["text"] == text:
                row["vs_fp16_percent"] = 100 * (row["perplexity"] / base - 1)
        for a, b in pairs:
            mean, se = paired_difference(nll[a], nll[b])
            contrasts.append({"text": text, "from": a, "to": b, "nats": mean, "se": se})

    for name, items in (("compare.jsonl", rows), ("contrasts.jsonl", contrasts)):
        with open(os.path.join(args.out, name), "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    texts = args.texts.split(",")
    by = {(r["text"], r["policy"]): r for r in rows}
    lines = ["| policy | G | B/token | " + " | ".join(f"{t} ppl (vs FP16)" for t in texts) + " |",
             "|---|--:|--:|" + "--:|" * len(texts)]
    for spec in specs:
        r0 = by[(texts[0], spec)]
        cells = [f"{by[(t, spec)]['perplexity']:.3f} ({by[(t, spec)]['vs_fp16_percent']:+.2f}%)" for t in texts]
        lines.append(f"| `{spec.partition(':')[0]}` | {r0['group_size'] or '-'} | {r0['kv_bytes_per_token']:,.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| from | to | " + " | ".join(f"{t}: nats/token (SE)" for t in texts) + " |",
              "|---|---|" + "--:|" * len(texts)]
    for a, b in pairs:
        cells = [next(f"{c['nats']:+.4f} ({c['se']:.4f})" for c in contrasts if (c["text"], c["from"], c["to"]) == (t, a, b))
                 for t in texts]
        lines.append(f"| `{a}` | `{b}` | " + " | ".join(cells) + " |")
    lines += ["", "| budget | best within it | B/token | " + " | ".join(f"{t} vs FP16" for t in texts) + " | bar | met |",
              "|---|---|--:|" + "--:|" * len(texts) + "--:|:-:|"]
    for limit, what, bar in BUDGETS:
        inside = [s for s in specs if s != "fp16" and by[(texts[0], s)]["kv_bytes_per_token"] <= limit + 0.5]
        if not inside:
            continue
        best = min(inside, key=lambda s: max(by[(t, s)]["vs_fp16_percent"] for t in texts))
        worst = max(by[(t, best)]["vs_fp16_percent"] for t in texts)
        cells = [f"{by[(t, best)]['vs_fp16_percent']:+.2f}%" for t in texts]
        lines.append(f"| <= {limit:,} ({what}) | `{best}` | {by[(texts[0], best)]['kv_bytes_per_token']:,.0f} | "
                     + " | ".join(cells) + f" | {bar:g}% | {'yes' if worst <= bar else 'no'} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
