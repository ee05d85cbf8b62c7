"""Where the loss of a 2-bit KV cache comes from: one layer's keys (or values) at 2 bits, the rest FP16.

For every layer l and side (keys, values), a KIVI policy stores that one layer's side at `--bits`
bits (keys per channel, values per token, groups of G, the W newest in 16 bits) and every other
K/V in 16 bits; the table is its perplexity change over FP16 on calibration text: the Sherlock
training part (train_controller.data, after the first 32768 tokens), which no report scores.
Then uniform policies with keys and values at different widths (K4V2 against K2V4) at equal bits.

    python experiments/sensitivity.py --segments 2 --context 1024 --out docs/results/sensitivity

writes `sensitivity.jsonl` (one line per policy: per-token NLL sum, tokens, perplexity) and
`sensitivity.png` (the per-layer cost of keys and of values) under --out, and prints the table.
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

from eval.perplexity import segment_nll
from kvjax import load_model
from kvjax.policies import Bands, get_policy
from train_controller.data import training_ids


def one_layer_policy(num_layers: int, layer: int, side: str, bits: int, window: int, group_size: int) -> Bands:
    """KIVI at `bits` for one layer's keys or values; 16 bits everywhere else."""
    low = tuple(bits if i == layer else 16 for i in range(num_layers))
    dense = (16,) * num_layers
    widths = (low, dense) if side == "keys" else (dense, low)
    return Bands(f"L{layer}-{side[0].upper()}{bits}", bands=(widths,), window=window, group_size=group_size)


def nll_of(model, segments, policy) -> tuple[float, int]:
    total, count = 0.0, 0
    for seg in segments:
        nll, _ = segment_nll(model.params, model.cfg, seg, policy)
        total, count = total + float(nll.astype(np.float64).sum()), count + nll.size
    return total, count


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024, help="tokens per scored segment")
    p.add_argument("--segments", type=int, default=2, help="segments of the calibration text")
    p.add_argument("--bits", type=int, default=2, help="width of the one quantized layer side")
    p.add_argument("--window", type=int, default=128, help="16-bit window W")
    p.add_argument("--group-size", type=int, default=32, help="quantization group G")
    p.add_argument("--out", default="docs/results/sensitivity", help="folder for the JSON lines and the plot")
    args = p.parse_args()
    if args.context < 2 or args.segments < 1:
        p.error("--context must be >= 2 and --segments >= 1")
    os.makedirs(args.out, exist_ok=True)

    model = load_model()
    L = model.cfg.num_layers
    ids = training_ids(model.tokenizer, max_tokens=args.context * args.segments)
    segments = [ids[i * args.context:(i + 1) * args.context] for i in range(args.segments)]
    o = {"window": args.window, "group_size": args.group_size}
    policies = [get_policy("fp16")]
    policies += [one_layer_policy(L, l, side, args.bits, **o) for side in ("keys", "values") for l in range(L)]
    policies += [get_policy(n, **o) for n in ("kivi2", "kivi-k4v2", "kivi-k2v4", "kivi4")]

    rows = []
    path = os.path.join(args.out, "sensitivity.jsonl")
    with open(path, "w") as f:
        for i, policy in enumerate(policies):
            t0 = time.perf_counter()
            total, count = nll_of(model, segments, policy)
            row = {"policy": policy.name, "nll_sum": total, "tokens": count, "perplexity": math.exp(total / count),
                   "context": args.context, "segments": args.segments, "window": args.window,
                   "group_size": args.group_size, "text": "sherlock-train"}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[{i + 1}/{len(policies)}] {policy.name:<12} ppl {row['perplexity']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    base = rows[0]["perplexity"]
    cost = lambda r: 100 * (r["perplexity"] / base - 1)
    by_name = {r["policy"]: r for r in rows}
    print(f"FP16 perplexity {base:.3f} ({rows[0]['tokens']} tokens of Sherlock's training part)")
    print(f"| layer | keys at {args.bits} bits | values at {args.bits} bits |\n|---:|---:|---:|")
    for l in range(L):
        k, v = by_name[f"L{l}-K{args.bits}"], by_name[f"L{l}-V{args.bits}"]
        print(f"| {l} | {cost(k):+.2f}% | {cost(v):+.2f}% |")
    for n in ("kivi2", "kivi-k4v2", "kivi-k2v4", "kivi4"):
        print(f"{n:<10} ppl {by_name[n]['perplexity']:.3f} ({cost(by_name[n]):+.2f}%)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(L)
    for off, side, color in ((-0.2, "K", "tab:blue"), (0.2, "V", "tab:orange")):
        ax.bar(x + off, [cost(by_name[f"L{l}-{side}{args.bits}"]) for l in range(L)], 0.4, color=color,
               label=f"{'keys' if side == 'K' else 'values'} of this layer at {args.bits} bits")
    ax.set_xlabel("layer")
    ax.set_ylabel("perplexity vs FP16 (%)")
    ax.set_xticks(x)
    ax.legend()
    ax.set_title(f"One layer side at {args.bits} bits, the rest FP16 (Sherlock training part, "
                 f"{args.segments} x {args.context} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sensitivity.png"), dpi=120)


if __name__ == "__main__":
    main()
