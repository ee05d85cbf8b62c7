"""Decode attention in plain XLA: the path of every backend without a kernel, and the kernels' reference.

A decode step's queries attend over the *parts* of a layer's cache (`Part`): a sink, a window, the
step's own token, a packed tier's slots, a KIVI tier's stage (float keys whose values are already
in the tier). Every part is read where it lies: its arrays keep their leading [L] axis and `layer`
says which entry is this layer's. `attention_partials(q, parts, group_size=)` returns the
flash-decoding partials of their union (`Partials`), `merge_partials` the normalized output; the
Pallas kernel (pallas_kernels.decode_attention) and the C++ CPU kernel (pallas_kernels.cpu_attention)
compute the same partials for the parts they take.

Packed codes are read without dequantizing a tier: scales and zeros are folded into the query and
into the probabilities,
  keys, per channel:  q . (s * code + z) = (q * s) . code + q . z      (s, z per group of G slots)
  values, per token:  sum_j p_j (s_j code_j + z_j) = sum_j (p_j s_j) code_j + sum_j p_j z_j
Each side is its own function, so a part may store its keys and values in different ways. q is
[b, k, g, h] (the g query heads of each kv head). How each is written was chosen by timing
XLA's CPU code (2-core Intel Xeon, SmolLM2-135M shapes, 8k slots): a score is an explicit sum
over the h channels, each term one unpacked code per slot, vectorized along the slots and summed
as a tree (a reduction over the packed words ran 4-8x slower, a dense 16-bit dot 3x slower);
the value mix unpacks the codes and lets XLA's dot do the sum (faster than any fused reduction).

Letters as in kvjax/docs/DESIGN.md: b batch, n query heads, k kv heads, g = n / k, h head dim,
c slots, G group size, w = h * bits / 32 code words per slot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Running max of a query with no valid slot (finite: merging it never makes inf - inf).
EMPTY_MAX = float(jnp.finfo(jnp.float32).min)
_HIGHEST = lax.Precision.HIGHEST
FLOATS = 16  # a side's bits when it is stored as floats (float16, bfloat16 or float32), not codes


class Partials(NamedTuple):
    """Flash-decoding partials of one part of the keys (all float32), per query head, over its valid
    slots j with s_j = q . key_j / sqrt(h): m = max_j s_j, l = sum_j exp(s_j - m),
    o = sum_j exp(s_j - m) * value_j. A query with no valid slot has m = EMPTY_MAX, l = 0, o = 0."""

    o: jax.Array  # [b, n, h] (unnormalized)
    m: jax.Array  # [b, n]
    l: jax.Array  # [b, n]


def empty_partials(*shape: int) -> Partials:
    """The partials of no slot, for queries [..., h] (e.g. b, n, h)."""
    return Partials(jnp.zeros(shape, jnp.float32), jnp.full(shape[:-1], EMPTY_MAX, jnp.float32),
                    jnp.zeros(shape[:-1], jnp.float32))


def combine(o, m, l, axis: int):
    """Log-sum-exp merge of stacked partials along `axis` (of m, l; o has a trailing h)."""
    m_all = jnp.max(m, axis=axis)
    # As in jax's decode_attention: keeps XLA from fusing the max into the exp (NaNs, b/389925439).
    m_all = lax.optimization_barrier(m_all)
    corr = jnp.exp(m - jnp.expand_dims(m_all, axis))  # empty parts: exp(EMPTY_MAX - m_all) = 0
    return (jnp.sum(o * corr[..., None], axis=axis), m_all, jnp.sum(l * corr, axis=axis))


def combine_partials(parts: Sequence[Partials]) -> Partials:
    """The partials of the union of the parts (log-sum-exp merge)."""
    if len(parts) == 1:
        return parts[0]
    o, m, l = (jnp.stack([p[i] for p in parts]) for i in range(3))  # [P, b, n, (h)]
    return Partials(*combine(o, m, l, axis=0))


@jax.jit
def merge_partials(parts: Sequence[Partials]):
    """Softmax attention over the union of the parts: float32 [b, n, h] (a query with no valid key
    anywhere gets 0)."""
    o, _, l = combine_partials(parts)
    return jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


# --------------------------------------------------------------------------- one side of a part

def unpack_codes(words, bits: int):
    """uint32 [..., w] -> float32 codes [..., w * 32 / bits] (first code in the lowest bits)."""
    per = 32 // bits
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    codes = (words[..., None] >> shifts) & jnp.uint32(2**bits - 1)  # [..., w, per]
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per).astype(jnp.float32)


def _tree_sum(terms):
    while len(terms) > 1:  # pairwise: short dependency chains
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _channel_sum(weights, codes, bits: int):
    """sum_d weights[..., d] * code_d over the h channels: weights [b, k, g, n, h], codes uint32
    [b, k, c, w] with c = n * r -> float32 [b, k, g, n, r]: one term per channel, each an unpacked
    code of every slot (the word's lane d % per), vectorized along the slots."""
    b, k, c, w = codes.shape
    n = weights.shape[3]
    if c == 0:
        return jnp.zeros(weights.shape[:4] + (0,), jnp.float32)
    per, mask = 32 // bits, jnp.uint32(2**bits - 1)
    words = jnp.swapaxes(codes, -1, -2).reshape(b, k, 1, w, n, c // n)  # [b, k, 1, w, n, r]
    terms = [weights[..., d, None] * ((words[:, :, :, d // per] >> jnp.uint32(bits * (d % per))) & mask)
             .astype(jnp.float32) for d in range(w * per)]
    return _tree_sum(terms)


def kivi_key_scores(q, codes, scale, zero, *, bits: int, group_size: int):
    """q . key of every slot of a KIVI key tier: q [b, k, g, h], codes [b, k, c, w], scale/zero
    [b, k, c/G, h] -> float32 [b, k, g, c] (not scaled by 1/sqrt(h))."""
    b, k, c, _ = codes.shape
    scale, zero = scale.astype(jnp.float32), zero.astype(jnp.float32)
    q_scaled = q[:, :, :, None, :] * scale[:, :, None]  # [b, k, g, n, h]
    q_zero = jnp.einsum("bkgh,bknh->bkgn", q, zero, precision=_HIGHEST)  # [b, k, g, n]
    main = _channel_sum(q_scaled, codes, bits)  # [b, k, g, n, G]
    return (main + q_zero[..., None]).reshape(b, k, q.shape[2], c)


def kivi_value_mix(p, codes, scale, zero, *, bits: int, group_size: int):
    """sum_j p_j value_j over a KIVI value tier: p [b, k, g, c], codes [b, k, c, w], scale/zero
    [b, k, c, h/G] -> float32 [b, k, g, h]."""
    b, k, c, w = codes.shape
    g, h = p.shape[2], w * 32 // bits
    m = h // group_size
    p_scaled = p[..., None] * scale.astype(jnp.float32)[:, :, None]  # [b, k, g, c, m]
    p_zero = jnp.einsum("bkgc,bkcm->bkgm", p, zero.astype(jnp.float32), precision=_HIGHEST)  # [b, k, g, m]
    by_group = unpack_codes(codes, bits).reshape(b, k, c, m, group_size)
    main = jnp.einsum("bkgcm,bkcmr->bkgmr", p_scaled, by_group, precision=_HIGHEST)  # [b, k, g, m, G]
    return (main + p_zero[..., None]).reshape(b, k, g, h)


def sym_scores(q, codes, scale, *, bits: int):
    """q . key over a symmetric tier: codes [b, k, c, w] (offset by 2**(bits-1)), scale [b, k, c, 1]."""
    b, k, c, _ = codes.shape
    q_sum = jnp.sum(q, axis=-1)[..., None]  # [b, k, g, 1]: q . offset / offset
    main = _channel_sum(q[:, :, :, None, :], codes, bits)[:, :, :, 0]  # [b, k, g, c]
    return (main - 2.0 ** (bits - 1) * q_sum) * scale[..., 0].astype(jnp.float32)[:, :, None]


def sym_mix(p, codes, scale, *, bits: int):
    """sum_j p_j value_j over a symmetric tier."""
    signed = unpack_codes(codes, bits) - 2.0 ** (bits - 1)  # [b, k, c, h]
    weights = p * scale[..., 0].astype(jnp.float32)[:, :, None]  # [b, k, g, c]
    return jnp.einsum("bkgc,bkch->bkgh", weights, signed, precision=_HIGHEST)


def dense_scores(q, x):
    """q . key over 16-bit (or float32) keys x [b, k, c, h]."""
    return jnp.einsum("bkgh,bkch->bkgc", q, x.astype(jnp.float32), precision=_HIGHEST,
                      preferred_element_type=jnp.float32)


def dense_mix(p, x):
    return jnp.einsum("bkgc,bkch->bkgh", p, x.astype(jnp.float32), precision=_HIGHEST,
                      preferred_element_type=jnp.float32)


def partials_of(scores, valid, mix) -> Partials:
    """Flash-decoding partials from scores float32 [b, k, g, c] (scaled) over the valid [b, c] slots, with
    mix(p [b, k, g, c]) -> [b, k, g, h] the weighted sum of the values (p is 0 on invalid slots)."""
    b, k, g, c = scores.shape
    mask = valid[:, None, None, :]
    scores = jnp.where(mask, scores, EMPTY_MAX)
    m = jnp.max(scores, axis=-1) if c else jnp.full((b, k, g), EMPTY_MAX, jnp.float32)  # [b, k, g]
    p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
    o = mix(p)
    return Partials(o.reshape(b, k * g, o.shape[-1]), m.reshape(b, k * g), jnp.sum(p, axis=-1).reshape(b, k * g))


def _grouped(q, k: int):
    b, n, h = q.shape
    return q.reshape(b, k, n // k, h).astype(jnp.float32)


def _grouped_partials(q, keys, values, valid) -> Partials:
    """q [b, n, h], keys/values [b, k, s, h], valid bool [b, s] -> float32 partials (pure jnp)."""
    qg = _grouped(q, keys.shape[1])
    values = jnp.where(valid[:, None, :, None], values.astype(jnp.float32), 0.0)  # empty slots may hold anything
    return partials_of(dense_scores(qg, keys) * (q.shape[-1] ** -0.5), valid, lambda p: dense_mix(p, values))



def packed_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, valid, *, key_bits: int,
                    value_bits: int, group_size: int) -> Partials:
    """Partials of q [b, n, h] over the valid [b, c] slots of a packed tier, straight from its codes
    (jnp; keys and values at their own widths; k_zero None: a symmetric tier)."""
    qg = _grouped(q, k_codes.shape[1])
    if k_zero is None:  # symmetric
        scores = sym_scores(qg, k_codes, k_scale, bits=key_bits)
        mix = lambda p: sym_mix(p, v_codes, v_scale, bits=value_bits)
    else:
        scores = kivi_key_scores(qg, k_codes, k_scale, k_zero, bits=key_bits, group_size=group_size)
        mix = lambda p: kivi_value_mix(p, v_codes, v_scale, v_zero, bits=value_bits, group_size=group_size)
    return partials_of(scores * q.shape[-1] ** -0.5, valid, mix)


@jax.jit
def dense_partials(q, k, v, valid) -> Partials:
    """Partials of q [b, n, h] over a 16-bit part: k, v [b, k, s, h] where valid [b, s] (pure jnp)."""
    return _grouped_partials(q, k, v, valid)


# --------------------------------------------------------------------------- parts


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a layer's cache, as every backend reads it: every array but `valid`,
    `value_offset` and `count` has a leading [L] axis, and entry `layer` of it is read where it
    lies (a decode step's layer scan passes a cache's whole arrays: slicing them would copy the
    layer out).

      keys    uint32 codes [L, b, k, c, h * key_bits / 32] with key_scale, key_zero
              (KIVI: [L, b, k, c / G, h]; symmetric: key_scale [L, b, k, c, 1], key_zero None),
              or float keys [L, b, k, c, h] with key_bits = FLOATS and no scale or zero
      values  likewise with c' slots (KIVI scales and zeros [L, b, k, c', h / G]); float values
              only beside float keys
      valid   bool [b, c]: the key slots that take part
      value_offset  int32 [b] or None (0): key slot j's value is value slot value_offset + j (a KIVI
              stage: keys in a float buffer, values already in their tier)
      count   int32 [b] or None: set where `valid` is exactly the first `count` slots (a tier filled
              in order), for kernels that read a prefix (pallas_kernels.decode_attention)
    """

    keys: jax.Array
    key_scale: jax.Array | None
    key_zero: jax.Array | None
    values: jax.Array
    value_scale: jax.Array | None
    value_zero: jax.Array | None
    valid: jax.Array
    layer: jax.Array  # int32 []
    value_offset: jax.Array | None = None
    count: jax.Array | None = None
    key_bits: int = FLOATS
    value_bits: int = FLOATS
    symmetric: bool = False

    @staticmethod
    def floats(keys, values, valid, layer):
        """A part stored as float keys and values [L, b, k, c, h] (a sink, a window)."""
        return Part(keys, None, None, values, None, None, valid, jnp.asarray(layer, jnp.int32))

    @property
    def packed(self) -> bool:
        return self.key_bits != FLOATS or self.value_bits != FLOATS


jax.tree_util.register_dataclass(
    Part, data_fields=["keys", "key_scale", "key_zero", "values", "value_scale", "value_zero", "valid", "layer",
                       "value_offset", "count"], meta_fields=["key_bits", "value_bits", "symmetric"])


def packed_part(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, valid, layer, *, key_bits: int,
                value_bits: int, symmetric: bool = False, count=None) -> Part:
    """A part of packed keys and values (a tier's slots); symmetric tiers have no zeros."""
    return Part(k_codes, k_scale, None if symmetric else k_zero, v_codes, v_scale, None if symmetric else v_zero,
                valid, jnp.asarray(layer, jnp.int32), count=count, key_bits=key_bits, value_bits=value_bits,
                symmetric=symmetric)


def check_parts(q, parts, group_size: int):
    """Validates q [b, n, h] against the parts' shapes -> (b, k, g, h)."""
    b, n, h = q.shape
    if not parts:
        raise ValueError("no parts to attend over")
    k = parts[0].keys.shape[2]
    if n % k:
        raise ValueError(f"{n} query heads over {k} kv heads")
    for part in parts:
        for name, x, bits in (("keys", part.keys, part.key_bits), ("values", part.values, part.value_bits)):
            width = h if bits == FLOATS else h * bits // 32
            if x.ndim != 5 or x.shape[1:3] != (b, k) or x.shape[-1] != width:
                raise ValueError(f"{name} {x.shape} do not hold [L, {b}, {k}, slots, {h}] at {bits} bits")
        if part.key_bits != FLOATS and part.value_bits == FLOATS:
            raise ValueError("packed keys with float values are not supported")
        if part.valid.shape != (b, part.keys.shape[3]):
            raise ValueError(f"valid {part.valid.shape} for {b} rows x {part.keys.shape[3]} slots")
        if part.packed and not part.symmetric and h % group_size:
            raise ValueError(f"group size {group_size} does not divide head dim {h}")
    return b, k, n // k, h


def part_partials(q, p: Part, *, group_size: int) -> Partials:
    """Partials of q [b, n, h] over one part (XLA)."""
    b, n, h = q.shape
    k = p.keys.shape[2]
    qg = q.reshape(b, k, n // k, h).astype(jnp.float32)
    at = lambda x: None if x is None else x[p.layer]
    keys, values = at(p.keys), at(p.values)
    v_scale, v_zero = at(p.value_scale), at(p.value_zero)
    if p.value_offset is not None:  # the values of key slots 0..c-1
        slots = p.value_offset[:, None] + jnp.arange(keys.shape[2])[None, :]  # [b, c]
        take = lambda x: None if x is None else jnp.take_along_axis(x, slots[:, None, :, None], axis=2)
        values, v_scale, v_zero = take(values), take(v_scale), take(v_zero)
    if p.key_bits == FLOATS:
        scores = dense_scores(qg, keys)
    elif p.symmetric:
        scores = sym_scores(qg, keys, at(p.key_scale), bits=p.key_bits)
    else:
        scores = kivi_key_scores(qg, keys, at(p.key_scale), at(p.key_zero), bits=p.key_bits, group_size=group_size)
    if p.value_bits == FLOATS:
        values = jnp.where(p.valid[:, None, :, None], values.astype(jnp.float32), 0.0)  # empty slots may hold NaN
        mix = lambda w: dense_mix(w, values)
    elif p.symmetric:
        mix = lambda w: sym_mix(w, values, v_scale, bits=p.value_bits)
    else:
        mix = lambda w: kivi_value_mix(w, values, v_scale, v_zero, bits=p.value_bits, group_size=group_size)
    return partials_of(scores * h ** -0.5, p.valid, mix)


@functools.partial(jax.jit, static_argnames=("group_size",))
def attention_partials(q, parts, *, group_size: int) -> Partials:
    """Partials of q [b, n, h] over the union of the parts' valid slots (XLA; the kernels' reference)."""
    parts = tuple(parts)
    check_parts(q, parts, group_size)
    return combine_partials([part_partials(q, p, group_size=group_size) for p in parts])


# --------------------------------------------------------------------------- many queries (prompt chunks)

CHUNK_SLOTS = 1024  # slots per block of `chunk_partials`: bounds the scores held at once


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slices:
    """`read` for `chunk_partials` from float keys and values in memory: [b, k, c, h], or [L, b, k, c, h]
    read at entry `layer` where they lie (a kernel takes them whole, so no layer is copied out)."""

    keys: jax.Array
    values: jax.Array
    layer: jax.Array | None = None

    def __call__(self, start: int, size: int):
        at = (lambda x: x) if self.layer is None else (lambda x: x[self.layer])
        return at(self.keys)[:, :, start:start + size], at(self.values)[:, :, start:start + size]


def slices(keys, values, layer=None) -> Slices:
    """`read` for `chunk_partials` from float keys and values [b, k, c, h] in memory (or [L, b, k, c, h]
    and the layer to read)."""
    return Slices(keys, values, layer)


def chunk_partials(q, read, mask, *, kv_heads: int, block: int = CHUNK_SLOTS, live=None) -> Partials:
    """Partials of the t queries of each row, q [b, t, n, h], over c slots where mask [b, t, c] lets a
    query see a slot -> Partials with o [b, t, n, h], m and l [b, t, n]. `read(start, size)` gives the
    float keys and values [b, k, size, h] of a block of slots (e.g. `slices`, or a packed tier's
    block decoded).

    Computed in blocks of `block` slots, so that at most [b, n, t, block] scores (and one block read)
    exist at a time; on a CPU a block no query sees (`live` [b, c], default: any query's mask) is
    skipped, not read. Slots no query sees may hold anything, NaN included."""
    b, t, n, h = q.shape
    k, g, c = kv_heads, n // kv_heads, mask.shape[2]
    qf = q.astype(jnp.float32).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    live = jnp.any(mask, axis=1) if live is None else live  # [b, c]
    per_query = lambda x: x.reshape((b, n, t) + x.shape[4:]).swapaxes(1, 2)  # [b, k, g, t, ...] -> [b, t, n, ...]

    def partials(start, size):
        seen = mask[:, :, start:start + size][:, None, None]  # [b, 1, 1, t, size]
        used = live[:, None, start:start + size, None]  # [b, 1, size, 1]
        kb, vb = (jnp.where(used, x.astype(jnp.float32), 0.0) for x in read(start, size))
        s = jnp.einsum("bkqh,bkch->bkqc", qf, kb, precision=_HIGHEST).reshape(b, k, g, t, size) * h ** -0.5
        s = jnp.where(seen, s, EMPTY_MAX)
        m = jnp.max(s, axis=-1)  # [b, k, g, t]
        p = jnp.where(seen, jnp.exp(s - m[..., None]), 0.0)
        o = jnp.einsum("bkqc,bkch->bkqh", p.reshape(b, k, g * t, size), vb, precision=_HIGHEST)
        return Partials(per_query(o.reshape(b, k, g, t, h)), per_query(m), per_query(jnp.sum(p, axis=-1)))

    # A conditional costs nothing on a CPU; a GPU copies its predicate to the host first, so there
    # every block is computed (masked) rather than skipped.
    skip = jax.default_backend() == "cpu"
    out = [lax.cond(jnp.any(live[:, start:start + block]), functools.partial(partials, start, min(block, c - start)),
                    lambda: empty_partials(b, t, n, h)) if skip else partials(start, min(block, c - start))
           for start in range(0, c, block)]
    return combine_partials(out) if out else empty_partials(b, t, n, h)


def banks_partials(q, banks, *, kv_heads: int) -> Partials:
    """Partials of a chunk's queries q [b, t, n, h] over the union of `banks`, each (read, mask [b, t, c],
    block) as `chunk_partials` takes them (XLA; the CPU kernel's reference: cpu_chunk_attention)."""
    out = [chunk_partials(q, read, mask, kv_heads=kv_heads, block=block) for read, mask, block in banks]
    return combine_partials(out) if out else empty_partials(*q.shape)
