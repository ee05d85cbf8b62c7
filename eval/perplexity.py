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
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax import sharding, teacher_forced
from kvjax.data import DATA_DIR, TEXTS, read_text
from kvjax.errors import KvjaxError
from kvjax import cli
from kvjax.flags import (add_devices_flag, add_policy_flags, add_weights_flag, mesh_from_flags, policies_from_flags,
                         weights_from_flags)
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
    nll, left = segments_nll(params, cfg, np.asarray(tokens)[None], policy, dtype)
    return nll[0], left[0]


def segments_nll(params, cfg, segments: np.ndarray, policy: Policy, dtype=jnp.float32, mesh=None):
    """`segment_nll` of each row of segments [n, T]: NLL [n, T-1] and the left tokens' bits per
    segment. On a mesh each device scores one segment at a time (kvjax.sharding): the last group is
    filled with copies of the last segment, whose results are dropped."""
    n, T = segments.shape
    per_group = sharding.size(mesh)
    rows = np.concatenate([segments, np.repeat(segments[-1:], sharding.padded(n, mesh) - n, axis=0)])
    scorer = _scorer(cfg, policy, T, dtype, mesh)
    params = sharding.replicate(params, mesh)
    nll, bits = [], []
    for start in range(0, len(rows), per_group):
        ids = sharding.place(jnp.asarray(rows[start:start + per_group], jnp.int32), mesh, sharding.ROWS)
        logp, at_last = scorer(params, ids)
        nll.append(-sharding.gather(logp)[:, :-1])
        bits.append(sharding.gather(at_last))
    nll, bits = np.concatenate(nll)[:n], np.concatenate(bits)[:n]
    if policy.layout(cfg, T) is None:  # fp16: no token leaves a window
        return nll, [np.zeros((0,), np.float32)] * n
    left = policy.layout(cfg, T).has_left(np.arange(T), T - 1)
    return nll, [row[left] for row in bits]


@functools.lru_cache(maxsize=8)
def _scorer(cfg, policy: Policy, length: int, dtype, mesh):
    """The jitted (params, ids [b, T]) -> (log p of each next token [b, T], the bits each token is
    stored at as the last query reads it [b, T]), run by every device of `mesh` on its rows."""
    def score(params, ids):
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
        targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # the last token predicts nothing scored
        logp, _, cache = teacher_forced.score_targets(params, cfg, ids, positions, targets, policy, length, dtype)
        bits = cache.bits_at(length - 1) if policy.layout(cfg, length) is not None else jnp.zeros_like(logp)
        return logp, bits
    rows = sharding.ROWS
    return jax.jit(sharding.per_device(score, mesh, (sharding.REPLICATED, rows), (rows, rows)))


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
    add_devices_flag(p)
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
    mesh = mesh_from_flags(args)
    text = read_text(args.text, args.data_dir)
    cli.say(f"[kvjax] loading {resolve_model(args.model)}")
    held = weights_from_flags(args)
    model = load_model(args.model, weights=held)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    if len(ids) < args.context * args.segments:
        raise KvjaxError(f"{args.text} has {len(ids)} tokens, fewer than --segments {args.segments} x "
                         f"--context {args.context}")
    print(f"{args.text}: {len(ids)} tokens; {args.segments} segment(s) of {args.context}; "
          f"{sharding.describe(mesh)}")
    segments = ids[:args.segments * args.context].reshape(args.segments, args.context)
    groups = range(0, args.segments, sharding.size(mesh))  # a segment per device at a time
    for policy in policies:
        t0, nll, left = time.perf_counter(), [], []
        for start in tqdm(groups, desc=policy, leave=False):
            group_nll, group_left = segments_nll(model.params, model.cfg, segments[start:start + groups.step],
                                                 specs[policy], mesh=mesh)
            nll.append(group_nll.reshape(-1))
            left.extend(group_left)
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
