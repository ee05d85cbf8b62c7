"""Perplexity of a model through each KV-cache policy, with the exact teacher-forced path.

    python -m eval.perplexity --kv fp16,kivi4,kivi2,int8-sink,streaming,mixed@3 \
        --text wikitext2 --context 4096 --segments 2

Texts: `wikitext2` and `sherlock` from the shared data folder (kvjax.data). Each segment of
`context` tokens is scored on its own; perplexity is exp(mean next-token NLL) over all of them.
Each result also records the widths the policy gave the tokens that had left the 16-bit window
by the last query of their segment (the tokens a budget counts): their average bits and shares.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax import teacher_forced
from kvjax.data import DATA_DIR, TEXTS, read_text
from kvjax.errors import KvjaxError
from kvjax import cli
from kvjax.flags import add_policy_flags, add_weights_flag, policies_from_flags, weights_from_flags
from kvjax.loading import load_model, read_config, resolve_model
from kvjax.policies import Policy, cache_bytes, family_of

@dataclasses.dataclass
class PerplexityResult:
    policy: str
    text: str
    context: int
    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood (nats)
    seconds: float
    kv_bytes_per_token: float  # bytes a decode cache for `context` tokens allocates, per token
    average_bits: float  # mean width of the left tokens (evicted = 0 bits); fp16: 16
    histogram: dict[str, float]  # width ("0" = evicted) -> share of the left tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def segment_nll(params, cfg, tokens: np.ndarray, policy: Policy, dtype=jnp.float32):
    """Next-token NLL [T-1] of one segment under `policy` (teacher-forced, exact), and the bits at
    which its left tokens were stored at the last query [L] (0 = evicted; fp16: none left)."""
    ids = jnp.asarray(tokens, jnp.int32)[None]
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # the last token predicts nothing scored
    logp, _, cache = teacher_forced.score_targets(params, cfg, ids, positions, targets, policy, ids.shape[1], dtype)
    left = np.zeros((0,), np.float32)
    if policy.layout(cfg, ids.shape[1]) is not None:  # tokens leave a window
        last = ids.shape[1] - 1
        bits = np.asarray(cache.bits_at(last)[0])
        left = bits[cache.layout.has_left(np.arange(len(bits)), last)]
    return -np.asarray(logp[0, :-1]), left


PAIRED_BLOCK = 128  # tokens per block of the paired standard error (neighbouring tokens' differences correlate)


def paired_difference(nll_a: np.ndarray, nll_b: np.ndarray, block: int = PAIRED_BLOCK) -> tuple[float, float]:
    """(mean per-token NLL of B minus A on the same tokens, its standard error over blocks of `block` tokens)."""
    diff = np.asarray(nll_b, np.float64) - np.asarray(nll_a, np.float64)
    blocks = diff[:len(diff) // block * block].reshape(-1, block).mean(axis=1)
    return float(diff.mean()), float(blocks.std(ddof=1) / np.sqrt(len(blocks)))


def width_summary(left: np.ndarray) -> tuple[float, dict[str, float]]:
    """(average bits, bits -> share) of the left tokens; no left tokens (fp16): 16 bits."""
    if left.size == 0:
        return 16.0, {"16": 1.0}
    values, counts = np.unique(left, return_counts=True)
    return float(left.mean()), {f"{w:g}": float(c / left.size) for w, c in zip(values, counts)}


def kv_bytes_per_token(policy: Policy, cfg, context: int) -> float:
    """Allocated bytes per token of a batch-1 cache for `context` tokens, 16-bit storage (nothing compiled)."""
    return cache_bytes(policy, cfg, 1, context, jnp.float16) / context


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eval.perplexity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=".gguf file, HF folder or hub id (default: embedded SmolLM2)")
    add_weights_flag(p)
    add_policy_flags(p, default="fp16,kivi4,kivi2")
    p.add_argument("--text", default="wikitext2", choices=sorted(TEXTS), help="the text to score")
    p.add_argument("--context", type=cli.at_least(2), default=4096, help="tokens per segment, each scored on its own")
    p.add_argument("--segments", type=cli.at_least(1), default=2, help="segments scored, from the start of the text")
    p.add_argument("--data-dir", default=DATA_DIR, help="the shared data folder (default: $KVJAX_DATA, else ../shared/data)")
    p.add_argument("--json", type=cli.output_file, default=None, help="append results as JSON lines to this file")
    return p


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    specs = {policy.name: policy for policy in policies_from_flags(args)}
    policies = list(specs)
    cfg = read_config(args.model)
    if cfg is not None:  # numbers before files: a bad --context is refused with or without the data folder
        if args.context > cfg.max_position_embeddings:
            raise KvjaxError(f"--context {args.context} exceeds the model's {cfg.max_position_embeddings} tokens")
        for policy in specs.values():
            policy.check(cfg)
    text = read_text(args.text, args.data_dir)
    cli.say(f"[kvjax] loading {resolve_model(args.model)}")
    held = weights_from_flags(args)
    model = load_model(args.model, weights=held)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    if len(ids) < args.context * args.segments:
        raise KvjaxError(f"{args.text} has {len(ids)} tokens, fewer than --segments {args.segments} x "
                         f"--context {args.context}")
    print(f"{args.text}: {len(ids)} tokens; {args.segments} segment(s) of {args.context}")
    for policy in policies:
        t0, nll, left = time.perf_counter(), [], []
        for s in tqdm(range(args.segments), desc=policy, leave=False):
            seg_nll, seg_left = segment_nll(model.params, model.cfg, ids[s * args.context:(s + 1) * args.context],
                                            specs[policy])
            nll.append(seg_nll)
            left.append(seg_left)
        nll = np.concatenate(nll)
        result = PerplexityResult(policy, args.text, args.context, len(nll), float(nll.mean()),
                                  time.perf_counter() - t0, kv_bytes_per_token(specs[policy], model.cfg, args.context),
                                  *width_summary(np.concatenate(left)))
        print(f"{policy:>16}  ppl {result.perplexity:8.3f}  KV {result.kv_bytes_per_token:7.1f} B/token  "
              f"bits {result.average_bits:5.2f}  ({result.tokens} tokens, {result.seconds:.0f} s)",
              flush=True)
        if args.json:
            with cli.open_for_append(args.json) as f:
                extra = {"controller": args.controller} if args.controller and getattr(specs[policy], "controller", None) else {}
                if args.allocation and family_of(policy).takes_allocation:
                    extra["allocation"] = args.allocation
                f.write(json.dumps({**dataclasses.asdict(result), "perplexity": result.perplexity,
                                    "model": model.source, "weights": held.value, **extra}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
