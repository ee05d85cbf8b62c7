"""Which distortion tracks perplexity: next-token KL against FP16, or the attention-output error.

For each layer side of the sensitivity table (docs/results/sensitivity: one layer's keys or values
at 2 bits, the rest FP16, its measured perplexity change on Sherlock's training part), computes on
the same text, through train_controller.allocate's RelaxedCache with that one unit at 2 bits:

  KL     mean over predicted tokens of KL(p_fp16 || p_quantized)
  attn   relative squared error of that layer's attention output, ||o_q - o|| ^ 2 / ||o|| ^ 2

and their rank (Spearman) and linear (Pearson) correlations with the perplexity change.

    python experiments/distortion.py --segments 2 --context 1024 --out docs/results/distortion.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvjax import load_model
from kvjax.model import forward
from kvjax.layout import WIDTHS
from train_controller.allocate import RelaxedCache, teacher_logprobs
from train_controller.data import training_ids


@struct.dataclass
class ErrorRecordingCache(RelaxedCache):
    """RelaxedCache that also records each layer's attention-output error against all-16-bit K/V."""

    errors: jax.Array = None  # float32 [l]

    def attend(self, layer, q, k, v, positions):
        out, cache = super().attend(layer, q, k, v, positions)
        dense = jnp.zeros_like(self.weights[0]).at[..., WIDTHS.index(16)].set(1.0)
        ref, _ = RelaxedCache.attend(self.replace(weights=self.weights.at[layer.index].set(dense)), layer, q, k, v,
                                     positions)
        err = jnp.sum((out - ref) ** 2) / jnp.sum(ref ** 2)
        return out, cache.replace(errors=cache.errors.at[layer.index].add(err))


def spearman(a, b):
    rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--table", default="docs/results/sensitivity/sensitivity.jsonl")
    p.add_argument("--out", default="docs/results/distortion.jsonl")
    args = p.parse_args()
    table = {r["policy"]: r for r in map(json.loads, open(args.table))}
    base = table["fp16"]["perplexity"]

    model = load_model()
    cfg, L = model.cfg, model.cfg.num_layers
    window, group = table["fp16"]["window"], table["fp16"]["group_size"]
    ids = training_ids(model.tokenizer, max_tokens=args.context * args.segments)
    segments = [ids[i * args.context:(i + 1) * args.context] for i in range(args.segments)]
    teacher = teacher_logprobs(model.params, cfg, segments)

    @jax.jit
    def measure(params, weights, tokens, logp):
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        cache = ErrorRecordingCache(weights, jnp.zeros((1,), jnp.int32), (1 << 30,), 0, window, group, L,
                                    jnp.zeros((L,), jnp.float32))
        logits, cache = forward(params, cfg, tokens, pos, cache)
        logq = jax.nn.log_softmax(logits[0, window:], axis=-1)
        kl = (jnp.exp(logp[window:]) * (logp[window:] - logq)).sum(-1).mean()
        return kl, cache.errors

    rows = []
    with open(args.out, "w") as f:
        for side_index, side in enumerate("KV"):
            for layer in range(L):
                weights = jnp.zeros((L, 2, 1, 4)).at[..., WIDTHS.index(16)].set(1.0)
                weights = weights.at[layer, side_index, 0].set(jax.nn.one_hot(WIDTHS.index(2), 4))
                kls, errs = zip(*(measure(model.params, weights, jnp.asarray(s)[None], jnp.asarray(t))
                                  for s, t in zip(segments, teacher)))
                row = {"unit": f"L{layer}-{side}2", "kl": float(np.mean(kls)),
                       "attn_error": float(np.mean([e[layer] for e in errs])),
                       "ppl_change_percent": 100 * (table[f"L{layer}-{side}2"]["perplexity"] / base - 1)}
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                print(f"{row['unit']:<7} KL {row['kl']:.5f}  attn error {row['attn_error']:.5f}  "
                      f"ppl {row['ppl_change_percent']:+.2f}%", file=sys.stderr, flush=True)
    ppl = np.asarray([r["ppl_change_percent"] for r in rows])
    for name in ("kl", "attn_error"):
        x = np.asarray([r[name] for r in rows])
        print(f"{name:<10} Spearman {spearman(x, ppl):+.3f}  Pearson {np.corrcoef(x, ppl)[0, 1]:+.3f} "
              f"(over {len(rows)} layer sides)")


if __name__ == "__main__":
    main()
