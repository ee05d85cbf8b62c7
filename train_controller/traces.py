"""Teacher-forced FP16 traces: per token, its features and a distortion target per width.

The FP16 model runs over chunks of training text (kvjax.model.forward_with_stats, which
also hands back each layer's queries; keys and values come from the dense cache); then,
layer by layer, `layer_distortion` computes for every token j and width w in {2, 4, 8}
how much storing j's K/V at w bits would disturb
the attention outputs of the queries that see j quantized (p - j >= W, j not a sink):

  D_j(w) = sum over layers, kv heads of
           sum_p a_pj^2 * ||dv_j||^2                                  (value error)
         + sum_p a_pj^2 * sum_c q_pc^2 dk_jc^2 / h * ||v_j - mean v||^2  (score error)

with a_pj the FP16 attention of query p on j summed as squares over the query heads of the
kv head (the attention-output MSE when token errors are independent), dv, dk the
quantize-dequantize errors of KIVI codecs (values per token; keys per channel in groups
of G consecutive tokens) and the score term a diagonal approximation of (q . dk)^2. D(16) = 0.
The target is the rate per future query: D_j / (number of queries that see j quantized);
tokens seen by fewer than `min_queries` such queries get weight 0.

Features come from `kvjax.features.token_features` on the same pass (FP16 logits, own K/V),
the same function the caches use. Chunks are written to disk (`chunk-00000.npz`, ...) with
`meta.json`, and reused: existing chunks are skipped, a folder made with other settings is
an error.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax.attention import MASK_VALUE, grouped_scores
from kvjax.cache import DenseCache
from kvjax.errors import KvjaxError
from kvjax.features import FEATURE_NAMES, token_features
from kvjax.layout import CODE_WIDTHS, has_left
from kvjax.model import forward_with_stats
from kvjax.stores import KiviKeys, KiviValues

def layer_distortion(q, keys, values, window: int, sinks: int, group_size: int):
    """One layer: q [b, T, n, h], keys/values [b, k, T, h] (positions 0..T-1) -> D [b, T, 3]."""
    b, kv, T, h = keys.shape
    j = jnp.arange(T)
    scores = grouped_scores(q, keys)  # [b, k, g, T, T]
    probs = jax.nn.softmax(jnp.where((j[None, :] <= j[:, None])[None, None, None], scores, MASK_VALUE), -1)
    far = has_left(j[None, :], j[:, None], sinks, window)  # [Tq, Tk]
    a2 = jnp.where(far, probs, 0.0) ** 2
    mass = a2.sum(axis=(2, 3))  # [b, k, T]
    qg = q.astype(jnp.float32).reshape(b, T, kv, -1, h).transpose(0, 2, 3, 1, 4)  # [b, k, g, T, h]
    q2 = jnp.einsum("bkgps,bkgph->bksh", a2, qg * qg)  # [b, k, T, h]
    v_dev = jnp.sum((values - values.mean(2, keepdims=True)) ** 2, -1)  # [b, k, T]
    g, f32 = group_size, jnp.float32
    dist = []
    for bits in CODE_WIDTHS:
        vq = KiviValues.roundtrip(values, bits, g, f32)
        kq = KiviKeys.roundtrip(keys, bits, g, f32)  # groups of G consecutive tokens
        dv = jnp.sum((vq - values) ** 2, -1)
        dk_score = jnp.sum(q2 * (kq - keys) ** 2, -1) / h
        dist.append(jnp.sum(mass * dv + dk_score * v_dev, axis=1))  # [b, T]
    return jnp.stack(dist, -1)


@functools.partial(jax.jit, static_argnames=("cfg", "window", "sinks", "group_size"))
def trace_chunk(params, tokens, *, cfg, window, sinks, group_size):
    """tokens int32 [b, T] (T % G == 0) -> (features [b, T, F], distortion [b, T, 4], far queries [b, T])."""
    b, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
    cache = DenseCache.init(cfg, b, T)
    logits, cache, (stats, queries) = forward_with_stats(params, cfg, tokens, positions, cache, queries=True)
    feats = token_features(logits, tokens, positions, stats)
    per_layer = jax.lax.map(lambda x: layer_distortion(*x, window, sinks, group_size), (queries, cache.k, cache.v))
    dist = jnp.concatenate([per_layer.sum(0), jnp.zeros((b, T, 1))], -1)
    j = jnp.arange(T)
    far_queries = jnp.sum(has_left(j[None, :], j[:, None], sinks, window), axis=0)  # queries that see j quantized
    return feats, dist, jnp.broadcast_to(far_queries, (b, T))


def write_traces(model, ids: np.ndarray, out_dir: str, chunk: int, window: int, sinks: int, group_size: int,
                 batch: int = 1, desc: str = "traces") -> list[str]:
    """Traces `ids` in chunks of `chunk` tokens into out_dir; returns the chunk files (existing ones reused)."""
    if chunk % group_size or chunk <= window:
        raise KvjaxError(f"trace chunk {chunk} must be a multiple of G={group_size} and longer than W={window}")
    meta = {"model": model.cfg.name, "vocab_size": model.cfg.vocab_size, "num_layers": model.cfg.num_layers,
            "chunk": chunk, "window": window, "sinks": sinks, "group_size": group_size,
            "features": list(FEATURE_NAMES), "tokens": int(len(ids)),
            "ids_sum": int(np.asarray(ids, np.int64) @ np.arange(1, len(ids) + 1) % (2**61))}
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            raise KvjaxError(f"{out_dir} holds traces made with other settings {diff}; use another --traces folder")
    else:
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
    n = len(ids) // chunk
    if n == 0:
        raise KvjaxError(f"{len(ids)} training tokens are fewer than one trace chunk of {chunk}")
    files = [os.path.join(out_dir, f"chunk-{i:05d}.npz") for i in range(n)]
    todo = [i for i in range(n) if not os.path.exists(files[i])]
    for start in tqdm(range(0, len(todo), batch), desc=desc, disable=not todo):
        idx = todo[start:start + batch]
        tokens = np.stack([ids[i * chunk:(i + 1) * chunk] for i in idx]).astype(np.int32)
        feats, dist, far = jax.device_get(trace_chunk(model.params, jnp.asarray(tokens), cfg=model.cfg,
                                                      window=window, sinks=sinks, group_size=group_size))
        for r, i in enumerate(idx):
            tmp = files[i] + ".tmp.npz"
            np.savez(tmp, tokens=tokens[r], features=feats[r], distortion=dist[r], far_queries=far[r])
            os.replace(tmp, files[i])  # a killed run leaves no half-written chunk
    return files


def load_traces(files: list[str]) -> dict[str, np.ndarray]:
    """Concatenates chunk files -> tokens [N], features [N, F], distortion [N, 4], far_queries [N]."""
    parts = []
    for path in files:
        try:
            with np.load(path) as z:
                parts.append({k: z[k] for k in ("tokens", "features", "distortion", "far_queries")})
        except Exception as e:
            raise KvjaxError(f"trace file {path} is damaged ({type(e).__name__}); delete it to recompute") from None
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
