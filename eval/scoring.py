"""Log-likelihood of multiple-choice continuations under a KV-cache policy, and accuracy.

A (context, continuation) pair is tokenized as lm-evaluation-harness's Hugging Face model does
(`encode_pair`) and scored in one teacher-forced pass: the sum of the continuation tokens'
log-probabilities. Pairs of many requests run together, right-padded (position -1) to a bucketed
length (multiples of BUCKET tokens) and a fixed batch size, so jit compiles only a few shapes.
Every policy goes through `kvjax.teacher_forced.score` (for fp16, a plain causal forward).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from kvjax import sharding, teacher_forced
from kvjax.policies import Policy, get_policy

from eval.tasks import TARGET_DELIMITER, Request

# Padded lengths are multiples of this (capped at the model's context). Scoring is compute-bound
# on a CPU (~350 tokens/s for the default model at any batch shape), so padding is lost time:
# the report's task sets pad 365k real tokens to 462k at 16, 794k at 64.
BUCKET = 16


def prefix_id(tokenizer) -> int:
    """The token an empty context becomes (the harness's prefix token): BOS, else EOS, else 0."""
    for token in (tokenizer.bos_id, tokenizer.eos_id):
        if token is not None:
            return token
    return 0


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's Hugging Face model makes them: trailing spaces
    of the context move to the continuation, the whole text is encoded and cut after the context's
    tokens, no BOS is added, and an empty context is the prefix token."""
    if not context:
        return [prefix_id(tokenizer)], tokenizer.encode(continuation, bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation, bos=False), tokenizer.encode(context, bos=False)
    return context_ids, whole[len(context_ids):]


def target_logprobs(params, inputs, targets, positions, *, cfg, policy):
    """log p(targets[b, t] | inputs[b, :t+1]) -> (float32 [b, T], bool [b, T]: each target the most likely)."""
    # capacity = the padded length: every row fits its tiers, as in a cache sized for it
    return teacher_forced.score_targets(params, cfg, inputs, positions, targets, policy, inputs.shape[1])[:2]


@functools.lru_cache(maxsize=16)
def _scorer(cfg, policy: Policy, mesh):
    """`target_logprobs`, jitted, run by every device of `mesh` on its rows (kvjax.sharding)."""
    rows = sharding.ROWS
    return jax.jit(sharding.per_device(functools.partial(target_logprobs, cfg=cfg, policy=policy), mesh,
                                       (sharding.REPLICATED, rows, rows, rows), (rows, rows)))


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of a row of n input tokens: n rounded up to a multiple of BUCKET, at most max_len."""
    return min(-(-n // BUCKET) * BUCKET, max_len)


def score_tokens(model, pairs: list[tuple[list[int], list[int]]], policy: str | Policy = "fp16", batch_size: int = 8,
                 on_done: Callable[[int, float, bool], None] | None = None, mesh=None) -> list[tuple[float, bool]]:
    """(summed log-probability, greedy) of each (context ids, continuation ids) pair: greedy when every
    continuation token is the most likely one (the harness's `is_greedy`).

    A pair is one row, its inputs `context + continuation` less the last token (the end kept if too
    long for the model, as the harness does). The rows are sorted by length and cut into batches of
    `batch_size` within each length bucket, so only the last batch of a bucket has spare rows; a row's
    scores depend on its own tokens and its bucket only, not on the rows beside it. `on_done(i, logp,
    greedy)` is called as soon as pair i is scored. On a `mesh` each device scores `batch_size` rows of
    a batch (kvjax.sharding): a row is scored in a batch of the shape one device gives it.
    """
    policy = get_policy(policy) if isinstance(policy, str) else policy
    policy.check(model.cfg)
    batch_size *= sharding.size(mesh)
    scorer, params = _scorer(model.cfg, policy, mesh), sharding.replicate(model.params, mesh)
    max_len = model.cfg.max_position_embeddings
    rows = []  # (pair, input ids, target ids, continuation tokens scored)
    for i, (ctx, cont) in enumerate(pairs):
        ids = (list(ctx) + list(cont))[-(max_len + 1):]
        rows.append((i, ids[:-1], ids[1:], min(len(cont), len(ids) - 1)))
    rows.sort(key=lambda row: -len(row[1]))  # longest first, as the harness
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    by_bucket: dict[int, list] = {}
    for row in rows:
        by_bucket.setdefault(bucket_length(len(row[1]), max_len), []).append(row)
    for length, bucket_rows in by_bucket.items():
        for start in range(0, len(bucket_rows), batch_size):
            batch = bucket_rows[start:start + batch_size]
            inputs = np.zeros((batch_size, length), np.int32)  # [b, T]; spare rows: all padding
            targets = np.zeros((batch_size, length), np.int32)
            positions = np.full((batch_size, length), -1, np.int32)
            for j, (_, inp, tgt, _) in enumerate(batch):
                inputs[j, :len(inp)], targets[j, :len(tgt)] = inp, tgt
                positions[j, :len(inp)] = np.arange(len(inp))
            logp, top = scorer(params, *sharding.place((inputs, targets, positions), mesh, sharding.ROWS))
            logp, top = sharding.gather(logp), sharding.gather(top)
            for j, (i, inp, _, k) in enumerate(batch):
                scored = slice(len(inp) - k, len(inp))
                out[i] = (float(logp[j, scored].sum()), bool(top[j, scored].all()))
                if on_done is not None:
                    on_done(i, *out[i])
    return out


def score_requests(model, requests: list[Request], policy: str | Policy = "fp16", batch_size: int = 8,
                   on_done: Callable[[int, list[float]], None] | None = None, mesh=None) -> list[list[float]]:
    """Summed log-probability of each request's continuations: one list per request (`score_tokens`
    over every (context, continuation) pair, tokenized as the harness does: `encode_pair`).
    `on_done(i, scores)` is called as soon as every continuation of request i is scored (for a
    resume cache)."""
    owners, pairs = [], []
    for r, req in enumerate(requests):
        for c, (context, continuation) in enumerate(zip(req.contexts, req.continuations)):
            owners.append((r, c))
            pairs.append(encode_pair(model.tokenizer, context, continuation))
    scores = [[0.0] * len(req.continuations) for req in requests]
    waiting = [len(req.continuations) for req in requests]

    def done(i, logp, _greedy):
        r, c = owners[i]
        scores[r][c] = logp
        waiting[r] -= 1
        if waiting[r] == 0 and on_done is not None:
            on_done(r, scores[r])

    score_tokens(model, pairs, policy, batch_size, done, mesh)
    return scores


def choice_bytes(continuation: str) -> int:
    """Length the harness normalizes by: the choice's UTF-8 bytes, without the target delimiter."""
    return max(len(continuation.removeprefix(TARGET_DELIMITER).encode("utf-8")), 1)


def picks(requests: list[Request], scores: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The chosen answer of each request: by summed log-prob (acc) and by log-prob per byte (acc_norm)."""
    by_sum = [int(np.argmax(np.asarray(s, np.float64))) for s in scores]
    by_byte = [int(np.argmax(np.asarray(s, np.float64) / [choice_bytes(c) for c in req.continuations]))
               for req, s in zip(requests, scores, strict=True)]
    return np.asarray(by_sum, np.int64), np.asarray(by_byte, np.int64)


def accuracy(requests: list[Request], scores: list[list[float]]) -> dict:
    """acc: argmax of summed log-prob; acc_norm: argmax of log-prob per byte of the choice."""
    if not requests:
        return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0}
    labels = np.asarray([req.label for req in requests])
    by_sum, by_byte = picks(requests, scores)
    return {"acc": float(np.mean(by_sum == labels)), "acc_norm": float(np.mean(by_byte == labels)), "n": len(requests)}
