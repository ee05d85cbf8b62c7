"""Fused decode attention over one packed tier: unpack, dequantize and attend in one kernel.

Modelled on jax.experimental.pallas.ops.gpu.decode_attention (kernel -> pallas_call wrapper ->
jitted public function -> pure-jnp reference). One decode step's queries attend to the valid
slots of a packed tier without materializing its 16-bit keys/values in memory: each program
reads bit-packed code words, unpacks them with shifts and masks, dequantizes in registers and
runs an online (flash) softmax over blocks of slots. The result is the flash-decoding partials
(o, m, l) of pallas_kernels.xla_attention, whose `merge_partials` combines them with those of the
other parts of a layer's cache into the softmax over their union. The references are XLA:
`tier_attention_partials_reference` (the same partials from the packed codes, xla_attention's path)
and `tier_attention_partials_dequantized` (the whole tier decoded, then attended).

Notation (kvjax/docs/DESIGN.md letters):
    b batch, k kv heads, n = k * g query heads, g query heads per kv head (GQA),
    h head dim, c tier slots, G group size, w = h * bits / 32 code words per slot,
    per = 32 / bits codes per word, r query rows per program (g padded, see DecodeBlocks),
    S slot splits, L = B * ceil(c / (S * B)) slots per split (the last may be short), B slots per
    inner block.

Tier layout (one layer; pallas_kernels.quantize_pack's codecs, KIVI):
    k_codes, v_codes  uint32 [b, k, c, w]  code d of a slot = word d // per, bits (d % per) * bits
    k_scale, k_zero   [b, k, c/G, h]       key[s, d]   = code * k_scale[s // G, d] + k_zero[s // G, d]
    v_scale, v_zero   [b, k, c, h/G]       value[s, d] = code * v_scale[s, d // G] + v_zero[s, d // G]
    symmetric tiers   k_zero = v_zero = None, k_scale, v_scale [b, k, c, 1]: codes offset by
                      2**(bits-1), x = (code - 2**(bits-1)) * scale (quantize_pack.encode_sym)
    count             int32 [b]            slots >= count are empty (callers exclude the slots of
                                           an unfinished key group from the count)
    q                 [b, n, h]            heads [i*g:(i+1)*g] read kv head i

Partials (float32), per query head, over the valid slots j, with s_j = q . key_j / sqrt(h):
    m = max_j s_j,  l = sum_j exp(s_j - m),  o = sum_j exp(s_j - m) * value_j
A query with no valid slot has m = EMPTY_MAX (finite), l = 0, o = 0: it adds nothing to a merge.

Kernel grid (b, k, S); program (i, j, t) handles the r query rows of kv head j of row i, so each
K/V tile is loaded once for all g heads, and loops over the ceil((count - t*L) / B) blocks of its
split that hold valid slots. Splits are merged with a log-sum-exp in the wrapper. On GPU each
block's [B, h] code, scale and zero tiles are built by gather loads (word d // per, scale row
s // G or column d // G), which measured ~15% faster on an H100 than unpacking with in-kernel
reshapes; TPU has no gather loads, so there the tiles come from contiguous block loads unpacked
by reshapes (`_block_tiles`). A float32 q gives exact float32 dots; a bf16/f16 q gives 16-bit
dot operands with float32 sums.

Backends: `tier_attention_partials` compiles for GPU (Pallas Triton; jax >= 0.10 defaults to
Mosaic GPU, so Triton compiler params are passed) and TPU (Mosaic); `interpret=True` runs the GPU
kernel in the Pallas interpreter and `interpret=pltpu.InterpretParams()` the TPU one in the TPU
interpreter; `backend="gpu"` / `"tpu"` picks the compiled path for another platform than
jax.default_backend() (quantize_pack.kernel_target says which). Mosaic TPU takes
a block's two minor dims only as full array dims or multiples of (8, 128), so every block here
spans its array's two minor dims; the TPU interpreter does not check this, lowering for TPU does
(tests/test_tpu_lowering.py, from a CPU host). Which of kernel and reference runs is decided by
the caller (kvjax.kernels), never here. Triton needs power-of-two tensor shapes: B, r, h are
powers of two (h is checked). The TPU path has run only in the interpreter and been lowered to
Mosaic, never compiled: its lane-dim reshapes ([B, w, per] -> [B, h]) may need another layout on
a real TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import quant
from pallas_kernels.quantize_pack import decode_key_groups, decode_sym, decode_values, kernel_target
from pallas_kernels import xla_attention as xla
from pallas_kernels.xla_attention import EMPTY_MAX, Partials, combine, empty_partials, packed_partials

_HIGHEST = lax.Precision.HIGHEST


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Static tiling of the kernel (hashable: a jit static argument).

    block_slots: B, slots per inner-loop step (a power of two).
    num_splits: S, splits of the slot axis run as separate programs (flash-decoding, for long
        tiers and small b * k); any c, at most ceil(c / B) splits.
    min_rows: the g query heads of a kv head are padded to r = max(min_rows, next_pow2(g))
        rows; Triton's tl.dot wants M >= 16.
    num_warps, num_stages: Triton compiler parameters (ignored elsewhere).
    """

    block_slots: int = 128
    num_splits: int = 1
    min_rows: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_slots", "num_splits", "min_rows", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecodeBlocks.{name} must be a positive int, got {value!r}")
        if not _is_pow2(self.block_slots) or self.block_slots < 8:
            raise ValueError(f"DecodeBlocks.block_slots must be a power of two >= 8, got {self.block_slots}")
        if not _is_pow2(self.min_rows):
            raise ValueError(f"DecodeBlocks.min_rows must be a power of two, got {self.min_rows}")


def auto_blocks(b: int, k: int, c: int, cores: int = 132) -> DecodeBlocks:
    """A tiling for b sequences x k kv heads over c slots (flash-decoding).

    Splits the slots until the b * k * S programs give each GPU core (132 on an H100) about
    four, keeping at least 256 slots per split. Chosen from `python -m pallas_kernels.bench
    --sweep` on an H100 (BENCHMARKS.md): 128-slot blocks, 4 warps, no software pipelining.
    """
    splits = 1
    while b * k * splits < 4 * cores and c // (2 * splits) >= 256:
        splits *= 2
    return DecodeBlocks(block_slots=128, num_splits=splits)


@dataclasses.dataclass(frozen=True)
class _Plan:
    splits: int  # S
    split_slots: int  # L, a multiple of B; S * L >= c
    block: int  # B
    rows: int  # r


def _plan(c: int, g: int, blocks: DecodeBlocks) -> _Plan:
    block = min(blocks.block_slots, 1 << (c.bit_length() - 1))  # B <= c: a block fits in the tier
    splits = min(blocks.num_splits, -(-c // block))
    split_slots = block * -(-c // (splits * block))
    splits = -(-c // split_slots)  # no split left empty
    rows = max(blocks.min_rows, 1 << (g - 1).bit_length())
    return _Plan(splits, split_slots, block, rows)


def _check_tier(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, bits, group_size):
    """Validates shapes; returns (b, k, g, h, c)."""
    bits = quant.check_bits(bits)
    if q.ndim != 3 or k_codes.ndim != 4:
        raise ValueError(f"q must be [b, n, h] and codes [b, k, c, w], got {q.shape} and {k_codes.shape}")
    b, n, h = q.shape
    _, k, c, w = k_codes.shape
    if (k_zero is None) != (v_zero is None):
        raise ValueError("k_zero and v_zero must both be arrays (KIVI) or both None (symmetric)")
    expected = {"k_codes": (b, k, c, h * bits // 32), "v_codes": (b, k, c, h * bits // 32), "count": (b,)}
    if k_zero is None:  # symmetric: one scale per slot
        expected.update(k_scale=(b, k, c, 1), v_scale=(b, k, c, 1))
    else:
        if h % group_size or c % group_size:
            raise ValueError(f"group_size={group_size} must divide head_dim={h} and slots={c}")
        expected.update(k_scale=(b, k, c // group_size, h), k_zero=(b, k, c // group_size, h),
                        v_scale=(b, k, c, h // group_size), v_zero=(b, k, c, h // group_size))
    arrays = {"k_codes": k_codes, "v_codes": v_codes, "k_scale": k_scale, "k_zero": k_zero,
              "v_scale": v_scale, "v_zero": v_zero, "count": count}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{name} must have shape {shape} for q {q.shape}, {bits} bits, "
                             f"G={group_size}, got {arrays[name].shape}")
    if (h * bits) % 32 or n % k:
        raise ValueError(f"head_dim * bits must fill whole words and kv heads divide query heads; "
                         f"got h={h}, bits={bits}, n={n}, k={k}")
    return b, k, n // k, h, c




def _unpack(words, bits: int):
    """uint32 [s, w] -> float32 codes [s, w * 32 / bits] (first code in the lowest bits)."""
    s, w = words.shape
    per = 32 // bits
    shifts = lax.broadcasted_iota(jnp.uint32, (1, 1, per), 2) * jnp.uint32(bits)  # [1, 1, per]
    codes = (words[:, :, None] >> shifts) & jnp.uint32(2**bits - 1)  # [s, w, per]
    return codes.reshape(s, w * per).astype(jnp.float32)


def _repeat(x, times: int, axis: int):
    """Repeats each entry `times` times along axis 0 or 1 of a 2-d array (broadcast + reshape)."""
    a, z = x.shape
    if axis == 0:
        return jnp.broadcast_to(x[:, None, :], (a, times, z)).reshape(a * times, z)
    return jnp.broadcast_to(x[:, :, None], (a, z, times)).reshape(a, z * times)


def _gather_tiles(kc, ks, kz, vc, vs, vz, s0, *, bits: int, G: int, B: int, h: int, c: int):
    """GPU: [B, h] key and value tiles of slots s0.. built by gather loads -> (keys, values, slot ids [1, B]).

    Code d of a slot is in word d // per at shift (d % per) * bits; key scales repeat over the G
    slots of a group, value scales over G channels (symmetric: one scale per slot). Each word and
    scale comes from memory once, its repeats from cache. Slots past the tier's end (a short last
    split) read its last slot; the caller masks them out.
    """
    per = 32 // bits
    row = lax.broadcasted_iota(jnp.int32, (B, h), 0)
    col = lax.broadcasted_iota(jnp.int32, (B, h), 1)
    shift = ((col % per) * bits).astype(jnp.uint32)
    slot = jnp.minimum(s0 + row, c - 1)  # [B, h]

    def dequantize(codes_ref, scale_ref, zero_ref, scale_row, scale_col):
        codes = ((codes_ref[slot, col // per] >> shift) & jnp.uint32(2**bits - 1)).astype(jnp.float32)
        scale = scale_ref[scale_row, scale_col].astype(jnp.float32)
        if zero_ref is None:
            return (codes - 2.0 ** (bits - 1)) * scale
        return codes * scale + zero_ref[scale_row, scale_col].astype(jnp.float32)

    if kz is None:  # symmetric
        first = jnp.zeros_like(col)
        keys, values = dequantize(kc, ks, None, slot, first), dequantize(vc, vs, None, slot, first)
    else:
        keys, values = dequantize(kc, ks, kz, slot // G, col), dequantize(vc, vs, vz, slot, col // G)
    return keys, values, s0 + lax.broadcasted_iota(jnp.int32, (1, B), 1)


def _block_tiles(kc, ks, kz, vc, vs, vz, s0, *, bits: int, G: int, B: int, h: int, c: int):
    """TPU (no gather loads): the same tiles from contiguous block loads, unpacked by reshapes.

    The block starts at min(s0, c - B) so that it stays inside the tier; slots before s0 (done by
    the previous block) are returned with their ids and masked out by the caller.
    """
    del h
    base = pl.multiple_of(jnp.minimum(s0, c - B), G)
    rows = pl.ds(base, B)
    if kz is None:  # symmetric: [B, 1] scales broadcast over the head dim
        keys = (_unpack(kc[rows, :], bits) - 2.0 ** (bits - 1)) * ks[rows, :].astype(jnp.float32)
        values = (_unpack(vc[rows, :], bits) - 2.0 ** (bits - 1)) * vs[rows, :].astype(jnp.float32)
    else:
        groups = pl.ds(base // G, B // G)
        keys = (_unpack(kc[rows, :], bits) * _repeat(ks[groups, :].astype(jnp.float32), G, axis=0)
                + _repeat(kz[groups, :].astype(jnp.float32), G, axis=0))
        values = (_unpack(vc[rows, :], bits) * _repeat(vs[rows, :].astype(jnp.float32), G, axis=1)
                  + _repeat(vz[rows, :].astype(jnp.float32), G, axis=1))
    return keys, values, base + lax.broadcasted_iota(jnp.int32, (1, B), 1)


def _tier_kernel(*refs, bits: int, group_size: int, block: int, split_slots: int, sm_scale: float,
                 symmetric: bool, gather: bool):
    # count_ref [b] (whole); q_ref [r, h]; the whole tier of one (row, kv head): kc_ref, vc_ref
    # [c, w]; KIVI: ks_ref, kz_ref [c/G, h], vs_ref, vz_ref [c, h/G]; symmetric: ks_ref, vs_ref
    # [c, 1], no zeros. Outputs o_ref [r, h]; m_ref, l_ref [r].
    if symmetric:
        count_ref, q_ref, kc_ref, ks_ref, vc_ref, vs_ref, o_ref, m_ref, l_ref = refs
        kz_ref = vz_ref = None
    else:
        count_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, o_ref, m_ref, l_ref = refs
    B, L = block, split_slots
    c = kc_ref.shape[0]
    r, h = q_ref.shape
    start = pl.program_id(2) * L  # first slot of this split
    count = count_ref[pl.program_id(0)]
    n_blocks = pl.cdiv(jnp.clip(count - start, 0, L), B)  # blocks holding a valid slot
    # float32 q: exact float32 dots; a 16-bit q: 16-bit operands (tensor cores), float32 sums.
    compute = q_ref.dtype
    precision = _HIGHEST if compute == jnp.float32 else None
    q = q_ref[...]  # [r, h]
    tiles = functools.partial(_gather_tiles if gather else _block_tiles, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref,
                              vz_ref, bits=bits, G=group_size, B=B, h=h, c=c)

    def body(i, carry):
        o, m, l = carry  # [r, h], [r], [r]
        s0 = pl.multiple_of(start + i * B, B)
        keys, values, ids = tiles(s0)  # [B, h], [B, h], [1, B]
        scores = lax.dot_general(q, keys.astype(compute), (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * sm_scale  # [r, B]
        valid = (ids >= s0) & (ids < count)  # [1, B]
        scores = jnp.where(valid, scores, EMPTY_MAX)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))  # real: the block has a valid slot
        corr = jnp.exp(m - m_new)  # [r]
        p = jnp.exp(scores - m_new[:, None])  # [r, B], 0 where invalid
        values = jnp.where(valid.reshape(B, 1), values, 0.0).astype(compute)  # empty slots may hold anything
        pv = lax.dot_general(p.astype(compute), values, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)  # [r, h]
        return corr[:, None] * o + pv, m_new, corr * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((r, h), jnp.float32), jnp.full((r,), EMPTY_MAX, jnp.float32),
            jnp.zeros((r,), jnp.float32))
    o, m, l = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _tier_pallas_call(q4, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, *, bits: int,
                      group_size: int, plan: _Plan, blocks: DecodeBlocks, interpret: bool, target: str):
    """q4 [b, k, r, h] -> o [b, k, S, r, h], m, l [b, k, S, 1, r] (per split, unmerged).

    target: kernel_target's 'triton', 'tpu' or 'interpret'. m and l carry a unit dim so that every
    block spans its array's two minor dims (Mosaic TPU takes a block's last two dims only as full
    array dims or multiples of (8, 128); a [b, k, S, r] array with [r] blocks fails for S > 1).
    """
    b, k, r, h = q4.shape
    S, G = plan.splits, group_size
    symmetric = k_zero is None
    gather = target != "tpu"
    if not gather and not symmetric and plan.block % G:
        raise ValueError(f"the TPU kernel needs block_slots ({plan.block}) to be a multiple of G ({G})")
    kernel = functools.partial(_tier_kernel, bits=bits, group_size=G, block=plan.block,
                               split_slots=plan.split_slots, sm_scale=h ** -0.5, symmetric=symmetric, gather=gather)
    # Every program sees the whole tier of its (row, kv head) and reads only its split's slots.
    whole = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j, t: (i, j, 0, 0))
    tier = [x for x in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) if x is not None]
    count_spec = pl.BlockSpec((b,), lambda i, j, t: (0,))  # the whole [b]; a program reads its row
    compiler_params = None
    if target == "triton":
        # Triton explicitly: with no compiler_params, jax >= 0.10 lowers to Mosaic GPU by default.
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    elif target == "tpu" and not interpret:
        from jax.experimental.pallas import tpu as pltpu

        count_spec = pl.BlockSpec(memory_space=pltpu.SMEM)  # scalars live in SMEM on TPU
    return pl.pallas_call(
        kernel,
        grid=(b, k, S),
        in_specs=[
            count_spec,  # count
            pl.BlockSpec((None, None, r, h), lambda i, j, t: (i, j, 0, 0)),  # q
            *(whole(x) for x in tier),  # codes, scales (and zeros) of keys, then of values
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, r, h), lambda i, j, t: (i, j, t, 0, 0)),  # o
            pl.BlockSpec((None, None, None, None, r), lambda i, j, t: (i, j, t, 0, 0)),  # m
            pl.BlockSpec((None, None, None, None, r), lambda i, j, t: (i, j, t, 0, 0)),  # l
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, k, S, r, h), jnp.float32),
            jax.ShapeDtypeStruct((b, k, S, 1, r), jnp.float32),
            jax.ShapeDtypeStruct((b, k, S, 1, r), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="packed_tier_decode_attention",
    )(count, q4, *tier)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "blocks", "interpret", "backend"))
def tier_attention_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, *,
                                   bits: int, group_size: int, blocks: DecodeBlocks = DecodeBlocks(),
                                   interpret: bool = False, backend: str | None = None) -> Partials:
    """Partials (o [b, n, h], m [b, n], l [b, n]) of q [b, n, h] over the first count [b] slots of a tier.

    backend: "gpu" or "tpu", the platform compiled for (None: jax.default_backend()); see
    quantize_pack.kernel_target.
    """
    b, k, g, h, c = _check_tier(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, bits, group_size)
    if c == 0:
        return empty_partials(b, k * g, h)
    target = kernel_target(interpret, backend)
    if target == "triton" and not _is_pow2(h):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim, got {h}")
    plan = _plan(c, g, blocks)
    q4 = q.reshape(b, k, g, h)
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, plan.rows - g), (0, 0)))  # [b, k, r, h]
    o, m, l = _tier_pallas_call(q4, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                count.astype(jnp.int32), bits=bits, group_size=group_size, plan=plan,
                                blocks=blocks, interpret=interpret, target=target)
    m, l = m[:, :, :, 0], l[:, :, :, 0]  # o [b, k, S, r, h]; m, l [b, k, S, r]
    if plan.splits == 1:
        o, m, l = o[:, :, 0], m[:, :, 0], l[:, :, 0]
    else:
        o, m, l = combine(o, m, l, axis=2)
    n = k * g
    return Partials(o[:, :, :g].reshape(b, n, h), m[:, :, :g].reshape(b, n), l[:, :, :g].reshape(b, n))


# --------------------------------------------------------------------------- references


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "blocks", "interpret", "backend"))
def tier_attention_partials_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, *,
                                      bits: int, group_size: int, blocks: DecodeBlocks | None = None,
                                      interpret: bool = False, backend: str | None = None) -> Partials:
    """The kernel's XLA reference: attention over the packed codes (no dequantized tier in memory).

    Same signature as the kernel; `blocks`, `interpret` and `backend` are accepted and ignored.
    """
    del blocks, interpret, backend
    b, k, g, h, c = _check_tier(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, bits, group_size)
    return packed_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                           jnp.arange(c)[None, :] < count[:, None], key_bits=bits, value_bits=bits,
                           group_size=group_size)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def tier_attention_partials_dequantized(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, *,
                                        bits: int, group_size: int) -> Partials:
    """Ground truth for the two above: dequantize the whole tier with quantize_pack's decoders, attend."""
    b, k, g, h, c = _check_tier(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, count, bits, group_size)
    if k_zero is None:  # symmetric
        keys = decode_sym(k_codes, k_scale, bits, jnp.float32)  # [b, k, c, h]
        values = decode_sym(v_codes, v_scale, bits, jnp.float32)
    else:
        keys = decode_key_groups(k_codes, k_scale, k_zero, bits, group_size, jnp.float32)
        values = decode_values(v_codes, v_scale, v_zero, bits, group_size, jnp.float32)
    return xla.dense_partials(q, keys, values, jnp.arange(c)[None, :] < count[:, None])
