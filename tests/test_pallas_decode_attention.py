"""Fused KIVI tier decode attention (pallas_kernels.decode_attention) against its references.

On CPU the kernel runs in the Pallas interpreter; with a GPU/TPU it runs compiled. Codes are
never zeros: random keys/values (channel offsets and scales, like real keys) are encoded with
pallas_kernels.quantize_pack. Shapes: b batch, k kv heads, g query heads per kv head, h head dim, c slots,
G group size, B block slots, S splits, n the per-row counts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import masked_attention
from pallas_kernels import quantize_pack as codecs
from pallas_kernels.decode_attention import (DecodeBlocks, tier_attention_partials,
                                             tier_attention_partials_dequantized, tier_attention_partials_reference)
from pallas_kernels.xla_attention import EMPTY_MAX, dense_partials, merge_partials

INTERPRET = jax.default_backend() == "cpu"
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """Full float32 matmuls in the jnp references (GPU defaults to TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    bits: int
    b: int
    k: int
    g: int
    h: int
    c: int
    G: int
    counts: tuple[int, ...]
    B: int = 128
    S: int = 1
    scale_dtype: str = "float32"

    def __str__(self):
        return (f"bits{self.bits}-b{self.b}k{self.k}g{self.g}-h{self.h}-c{self.c}-G{self.G}-B{self.B}-S{self.S}"
                f"-n{'.'.join(map(str, self.counts))}-{self.scale_dtype}")


def random_tier(seed, b, k, c, h, bits, G, dtype=jnp.float32):
    """Encoded random tier (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) and its dequantized K, V."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0.0, 1.0, (1, k, 1, h))
    spread = rng.uniform(0.2, 3.0, (1, k, 1, h))  # a few wide channels, as real keys have
    keys = jnp.asarray(offset + spread * rng.standard_normal((b, k, c, h)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, k, c, h)), jnp.float32)
    return _encode_decode(keys, values, bits, G, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _encode_decode(keys, values, bits, G, dtype):
    kc, ks, kz = codecs.encode_key_groups_reference(keys, bits, G, dtype)
    vc, vs, vz = codecs.encode_values_reference(values, bits, G, dtype)
    deq_k = codecs.decode_key_groups(kc, ks, kz, bits, G, jnp.float32)
    deq_v = codecs.decode_values(vc, vs, vz, bits, G, jnp.float32)
    return (kc, ks, kz, vc, vs, vz), deq_k, deq_v


def random_q(seed, b, n, h):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, n, h)), jnp.float32)


def assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert np.all(np.isfinite(actual)), "NaN/inf in the kernel output"
    scale = np.max(np.abs(expected[expected != EMPTY_MAX]), initial=1.0)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)


CASES = [
    Case(bits=2, b=1, k=1, g=1, h=16, c=64, G=16, counts=(37,), B=16),
    Case(bits=2, b=2, k=2, g=3, h=64, c=256, G=32, counts=(0, 200), B=64, S=2),
    Case(bits=2, b=2, k=1, g=2, h=64, c=96, G=32, counts=(33, 96), B=64, S=2),  # a short last split
    Case(bits=2, b=2, k=2, g=3, h=64, c=32 * 37, G=32, counts=(32 * 37, 700), B=64, S=8),  # c = G * prime
    Case(bits=4, b=2, k=3, g=2, h=64, c=128, G=32, counts=(128, 65), B=64),
    Case(bits=4, b=1, k=2, g=1, h=16, c=192, G=16, counts=(130,), B=64, S=3),
    Case(bits=4, b=1, k=2, g=2, h=64, c=128, G=32, counts=(90,), B=32, S=2, scale_dtype="bfloat16"),
    Case(bits=8, b=2, k=1, g=3, h=64, c=256, G=64, counts=(1, 255), B=64),
    Case(bits=8, b=2, k=3, g=2, h=16, c=96, G=16, counts=(96, 0), B=32),
]


def check_case(case, interpret, seed=0):
    """The kernel (run with `interpret`) against the reference on one random KIVI tier."""
    tier, _, _ = random_tier(seed, case.b, case.k, case.c, case.h, case.bits, case.G, jnp.dtype(case.scale_dtype))
    q = random_q(seed + 1, case.b, case.k * case.g, case.h)
    count = jnp.asarray(case.counts, jnp.int32)
    kw = dict(bits=case.bits, group_size=case.G)
    blocks = DecodeBlocks(block_slots=case.B, num_splits=case.S)
    got = tier_attention_partials(q, *tier, count, **kw, blocks=blocks, interpret=interpret)
    want = tier_attention_partials_reference(q, *tier, count, **kw)
    for name, a, e in zip("oml", got, want):
        assert a.shape == e.shape and a.dtype == jnp.float32, name
        assert_close(a, e)
    empty = np.asarray(case.counts) == 0
    assert np.all(np.asarray(got.m)[empty] == EMPTY_MAX)
    assert np.all(np.asarray(got.l)[empty] == 0) and np.all(np.asarray(got.o)[empty] == 0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case):
    check_case(case, INTERPRET)


MERGE_CASES = [  # (b, k, g, h, G, tier slots, dense slots)
    (2, 2, 2, 64, 32, 128, 24),
    (1, 3, 3, 16, 16, 64, 8),
]


@pytest.mark.parametrize("b,k,g,h,G,c,s", MERGE_CASES,
                         ids=[f"b{b}k{k}g{g}-h{h}-G{G}-c{c}-dense{s}" for b, k, g, h, G, c, s in MERGE_CASES])
def test_merge_equals_softmax_over_union(b, k, g, h, G, c, s):
    """merge(2-, 4-, 8-bit tier partials + a 16-bit dense part) = softmax attention over their union."""
    rng = np.random.default_rng(2)
    q = random_q(3, b, k * g, h)
    parts, keys, values, masks = [], [], [], []
    for i, bits in enumerate((2, 4, 8)):
        tier, deq_k, deq_v = random_tier(10 + i, b, k, c, h, bits, G)
        count = rng.integers(0, c + 1, b).astype(np.int32)
        count[0] = c if i == 0 else 0  # full and empty tiers, ragged otherwise
        parts.append(tier_attention_partials(q, *tier, jnp.asarray(count), bits=bits, group_size=G,
                                                    blocks=DecodeBlocks(block_slots=32), interpret=INTERPRET))
        keys.append(deq_k), values.append(deq_v), masks.append(np.arange(c)[None, :] < count[:, None])
    dense_k = jnp.asarray(rng.standard_normal((b, k, s, h)), jnp.bfloat16)
    dense_v = jnp.asarray(rng.standard_normal((b, k, s, h)), jnp.bfloat16)
    dense_valid = rng.random((b, s)) < 0.7
    dense_valid[:, 0] = True  # every row attends to something
    parts.append(dense_partials(q, dense_k, dense_v, jnp.asarray(dense_valid)))

    got = merge_partials(parts)
    keys = jnp.concatenate(keys + [dense_k.astype(jnp.float32)], axis=2)
    values = jnp.concatenate(values + [dense_v.astype(jnp.float32)], axis=2)
    mask = jnp.asarray(np.concatenate(masks + [dense_valid], axis=1))[:, None, :]  # [b, 1, 3c + s]
    want = masked_attention(q[:, None], keys, values, mask)[:, 0]  # [b, n, h]
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert_close(got, want)


def test_empty_tiers_merge_to_zero_without_nan():
    b, k, g, h, c, G = 2, 1, 2, 16, 32, 16
    tier, _, _ = random_tier(4, b, k, c, h, 4, G)
    q = random_q(5, b, k * g, h)
    zero = jnp.zeros((b,), jnp.int32)
    part = tier_attention_partials(q, *tier, zero, bits=4, group_size=G,
                                          blocks=DecodeBlocks(block_slots=16), interpret=INTERPRET)
    dense = dense_partials(q, jnp.ones((b, k, 4, h)), jnp.ones((b, k, 4, h)), jnp.zeros((b, 4), bool))
    out = np.asarray(merge_partials([part, dense]))
    assert np.all(out == 0)
    # A tier with no slots at all.
    none = tuple(x[:, :, :0] for x in tier)
    for fn in (tier_attention_partials, tier_attention_partials_reference):
        o, m, l = fn(q, *none, zero, bits=4, group_size=G)
        assert o.shape == (b, k * g, h) and np.all(np.asarray(m) == EMPTY_MAX) and np.all(np.asarray(l) == 0)


@pytest.mark.parametrize("kwargs", [dict(block_slots=48), dict(block_slots=4), dict(num_splits=0),
                                    dict(min_rows=3), dict(num_warps=1.5)], ids=str)
def test_blocks_are_checked(kwargs):
    with pytest.raises(ValueError):
        DecodeBlocks(**kwargs)


def test_bad_shapes_and_blocks_raise():
    tier, _, _ = random_tier(8, 1, 1, 64, 16, 4, 16)
    q = random_q(9, 1, 2, 16)
    count = jnp.array([10], jnp.int32)
    with pytest.raises(ValueError, match="k_scale"):
        tier_attention_partials(q, tier[0], tier[1][:, :, :2], *tier[2:], count, bits=4, group_size=16,
                                       interpret=INTERPRET)
    with pytest.raises(ValueError, match="bits"):
        tier_attention_partials_reference(q, *tier, count, bits=3, group_size=16)


@pytest.mark.parametrize("bits", [2, 4])
def test_bf16_queries_use_16bit_dots(bits):
    """A bf16 q runs the dots on bf16 operands with float32 sums (tensor cores on GPU): close to float32."""
    b, k, g, h, c, G = 2, 2, 3, 64, 256, 32
    tier, _, _ = random_tier(11, b, k, c, h, bits, G, jnp.bfloat16)
    q = random_q(12, b, k * g, h)
    count = jnp.asarray([c, 150], jnp.int32)
    kw = dict(bits=bits, group_size=G)
    got = tier_attention_partials(q.astype(jnp.bfloat16), *tier, count, **kw,
                                         blocks=DecodeBlocks(block_slots=64, num_splits=2), interpret=INTERPRET)
    want = tier_attention_partials_reference(q.astype(jnp.bfloat16).astype(jnp.float32), *tier, count, **kw)
    got_out, want_out = (np.asarray(p.o / p.l[..., None]) for p in (got, want))
    np.testing.assert_allclose(got_out, want_out, atol=3e-2 * np.abs(want_out).max())
    np.testing.assert_allclose(np.asarray(got.m), np.asarray(want.m), rtol=2e-2, atol=2e-2)


def check_symmetric(bits, c, counts, S, interpret, seed=13):
    """The kernel (run with `interpret`) against the reference on a random symmetric tier -> inputs, partials."""
    b, k, g, h = 2, 2, 3, 64
    rng = np.random.default_rng(seed)
    kc, ks = codecs.encode_sym_reference(jnp.asarray(rng.normal(0.5, 2.0, (b, k, c, h)), jnp.float32), bits, jnp.float32)
    vc, vs = codecs.encode_sym_reference(jnp.asarray(rng.standard_normal((b, k, c, h)), jnp.float32), bits, jnp.float32)
    args = (random_q(seed + 1, b, k * g, h), kc, ks, None, vc, vs, None, jnp.asarray(counts, jnp.int32))
    got = tier_attention_partials(*args, bits=bits, group_size=32,
                                         blocks=DecodeBlocks(block_slots=32, num_splits=S), interpret=interpret)
    want = tier_attention_partials_reference(*args, bits=bits, group_size=32)
    for a, e in zip(got, want):
        assert_close(a, e)
    return args, got


@pytest.mark.parametrize("bits,c,counts,S", [(8, 96, (96, 41), 2), (4, 64, (0, 17), 1), (2, 160, (160, 129), 4)])
def test_symmetric_tier_matches_reference(bits, c, counts, S):
    """Symmetric per-token tiers (selective int8/int4/int2): no zeros, one scale per slot."""
    (q, kc, ks, _, vc, vs, _, count), got = check_symmetric(bits, c, counts, S, INTERPRET)
    deq_k = codecs.decode_sym(kc, ks, bits, jnp.float32)
    deq_v = codecs.decode_sym(vc, vs, bits, jnp.float32)
    mask = (jnp.arange(c)[None, :] < count[:, None])[:, None, :]
    full = masked_attention(q[:, None], deq_k, deq_v, mask)[:, 0]
    merged = merge_partials([got])
    rows = np.asarray(counts) > 0
    assert_close(np.asarray(merged)[rows], np.asarray(full)[rows])


TPU_CASES = [  # the TPU path: contiguous block loads unpacked by reshapes instead of gathers
    Case(bits=2, b=2, k=2, g=3, h=64, c=160, G=32, counts=(160, 100), B=64, S=2),  # a short last split
    Case(bits=4, b=1, k=2, g=2, h=64, c=128, G=32, counts=(90,), B=32, S=2, scale_dtype="bfloat16"),
    Case(bits=8, b=2, k=1, g=3, h=64, c=96, G=32, counts=(1, 96), B=64),
]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU interpreter is checked on CPU")
@pytest.mark.parametrize("case", TPU_CASES, ids=str)
def test_tpu_interpret_matches_reference(case):
    from jax.experimental.pallas import tpu as pltpu

    check_case(case, pltpu.InterpretParams(), seed=15)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU interpreter is checked on CPU")
def test_tpu_interpret_symmetric_tier():
    from jax.experimental.pallas import tpu as pltpu

    check_symmetric(8, 96, (96, 50), 2, pltpu.InterpretParams(), seed=17)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_reference_equals_dequantized_attention(case):
    """The XLA reference reads packed codes (scales folded into q and p) and equals attention over the
    dequantized tier to float32 rounding."""
    tier, _, _ = random_tier(21, case.b, case.k, case.c, case.h, case.bits, case.G, jnp.dtype(case.scale_dtype))
    q = random_q(22, case.b, case.k * case.g, case.h)
    count = jnp.asarray(case.counts, jnp.int32)
    kw = dict(bits=case.bits, group_size=case.G)
    got = tier_attention_partials_reference(q, *tier, count, **kw)
    want = tier_attention_partials_dequantized(q, *tier, count, **kw)
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.parametrize("bits,c,counts", [(8, 96, (96, 41)), (4, 64, (0, 17)), (2, 160, (160, 129))])
def test_packed_symmetric_reference_equals_dequantized_attention(bits, c, counts):
    rng = np.random.default_rng(23)
    b, k, g, h = 2, 2, 3, 64
    kc, ks = codecs.encode_sym_reference(jnp.asarray(rng.normal(0.5, 2.0, (b, k, c, h)), jnp.float32), bits, jnp.float32)
    vc, vs = codecs.encode_sym_reference(jnp.asarray(rng.standard_normal((b, k, c, h)), jnp.float32), bits, jnp.float32)
    args = (random_q(24, b, k * g, h), kc, ks, None, vc, vs, None, jnp.asarray(counts, jnp.int32))
    for a, e in zip(tier_attention_partials_reference(*args, bits=bits, group_size=32),
                    tier_attention_partials_dequantized(*args, bits=bits, group_size=32)):
        assert_close(a, e)
