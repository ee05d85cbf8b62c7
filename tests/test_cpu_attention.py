"""The C++ CPU kernels (pallas_kernels.cpu_attention: a decode step; cpu_chunk_attention: a prompt
chunk's queries) against their jnp references.

Random keys/values are encoded with pallas_kernels.quantize_pack; the kernel and the reference
attend over the same codes (and float parts), so they agree to float32 rounding (the kernel sums
in another order and uses its own exp). Both builds are checked: the one with this CPU's vector extensions (what
kvjax uses) and the portable one. Shapes: b batch, k kv heads, g query heads per kv head, h head
dim, c slots, G group size.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_attention, cpu_chunk_attention, xla_attention
from pallas_kernels import quantize_pack as codecs
from pallas_kernels.decode_attention import tier_attention_partials_dequantized
from pallas_kernels.xla_attention import EMPTY_MAX

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu_attention.available(),
                                reason=f"no CPU kernel here: {cpu_attention.unavailable_reason()}")
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    k: int
    g: int
    h: int
    c: int
    key_bits: int
    value_bits: int
    G: int = 32
    symmetric: bool = False
    dtype: str = "float16"  # of scales and zeros
    valid: str = "random"  # random | prefix | ring | none


CASES = [
    Case(1, 3, 3, 64, 1024 + 96, 2, 2),  # SmolLM2-135M's heads, three blocks
    Case(2, 3, 3, 64, 544, 4, 4, valid="prefix"),
    Case(2, 1, 4, 128, 608, 8, 4, G=16, dtype="bfloat16"),
    Case(1, 2, 1, 16, 96, 4, 2, G=4, dtype="float32"),  # groups shorter than a vector of 16 slots
    Case(1, 3, 3, 64, 160, 2, 4, G=8),  # value groups shorter than a vector of 16 channels
    Case(1, 2, 9, 16, 40, 2, 4, G=4, valid="ring"),  # three items of query heads (4 + 4 + 1)
    Case(2, 1, 6, 96, 1200, 4, 8, G=48),  # groups that straddle vectors of 16 slots
    Case(2, 1, 3, 96, 320, 4, 4),  # 4-bit values 64 + 32 channels at a time
    Case(1, 2, 2, 128, 256, 2, 4, G=64, valid="prefix"),
    Case(2, 3, 3, 64, 704, 2, 8, symmetric=True),
    Case(1, 1, 5, 16, 25, 8, 2, symmetric=True, dtype="float32", valid="prefix"),
    Case(2, 2, 2, 32, 64, 2, 2, G=8, valid="none"),
    Case(1, 1, 1, 64, 0, 2, 2),
]


def valid_slots(rng, b, c, pattern, *, fraction=0.7, least=0):
    """bool [b, c]: random (each slot with probability `fraction`), a prefix, a ring (a prefix and a
    suffix) of at least `least` slots, or none."""
    slot = np.arange(c)[None, :]
    counts = rng.integers(least, c + 1, (b, 1))
    return {"random": rng.random((b, c)) < fraction,
            "prefix": slot < counts,
            "ring": (slot < counts // 3) | (slot >= c - counts // 2),
            "none": np.zeros((b, c), bool)}[pattern]


def make(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, k, c, h = case.b, case.k, case.c, case.h
    offsets = rng.normal(size=(1, k, 1, h)) * 2  # per-channel offsets and spreads, like real keys
    keys = jnp.asarray(offsets + rng.normal(size=(b, k, c, h)) * rng.uniform(0.5, 2, (1, k, 1, h)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, k, c, h)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, k * case.g, h)) * 2, jnp.float32)
    dtype = jnp.dtype(case.dtype)
    if case.symmetric:
        (kc, ks), (vc, vs) = codecs.encode_sym_reference(keys, case.key_bits, dtype), \
            codecs.encode_sym_reference(values, case.value_bits, dtype)
        kz = vz = None
    else:
        kc, ks, kz = codecs.encode_key_groups_reference(keys, case.key_bits, case.G, dtype)
        vc, vs, vz = codecs.encode_values_reference(values, case.value_bits, case.G, dtype)
    valid = valid_slots(rng, b, c, case.valid)
    if case.valid != "none" and b > 1:
        valid[-1] = False  # one row with no valid slot
    tier = (kc, ks, kz, vc, vs, vz, jnp.asarray(valid))
    return q, tier, dict(key_bits=case.key_bits, value_bits=case.value_bits, symmetric=case.symmetric)


def part_of(tier, layers=1, layer=0, **kw):
    """A packed part of a [layers, ...] cache whose every layer holds `tier`."""
    stack = lambda x: None if x is None else jnp.stack([x] * layers)
    *arrays, valid = tier
    return cpu_attention.packed_part(*map(stack, arrays), valid, jnp.int32(layer), **kw)


def attention(p):
    """Normalized attention output [b, n, h] of partials (0 where nothing is valid)."""
    return np.where(np.asarray(p.l)[..., None] > 0, np.asarray(p.o) / np.maximum(np.asarray(p.l), 1e-30)[..., None], 0)


def assert_partials_close(got, want):
    o, w = attention(got), attention(want)
    scale = max(float(np.abs(w).max()), 1e-30)
    assert float(np.abs(o - w).max()) <= TOL * scale, float(np.abs(o - w).max()) / scale
    np.testing.assert_allclose(np.asarray(got.l), np.asarray(want.l), rtol=TOL, atol=0)
    np.testing.assert_allclose(np.asarray(got.m), np.asarray(want.m), rtol=TOL, atol=1e-6)


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_equals_reference(case, portable):
    q, tier, kw = make(case)
    parts = [part_of(tier, layers=2, layer=1, **kw)]
    got = cpu_attention.attention_partials(q, parts, group_size=case.G, portable=portable)
    want = cpu_attention.attention_partials_reference(q, parts, group_size=case.G)
    assert_partials_close(got, want)
    empty = ~np.asarray(tier[-1]).any(axis=1)  # rows with no valid slot add nothing to a merge
    assert np.all(np.asarray(got.m)[empty] == EMPTY_MAX) and np.all(np.asarray(got.l)[empty] == 0)
    assert np.all(np.asarray(got.o)[empty] == 0)


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("float_dtype", ["float16", "bfloat16", "float32"])
def test_a_whole_layer_equals_reference(float_dtype, portable):
    """What a KIVI layer passes: float sink and window, the packed tier, and its stage (float keys,
    the values at the stage's tier slots), in one call; empty float slots hold NaN, never read."""
    case = Case(2, 3, 3, 64, 640, 2, 4, valid="prefix")
    q, tier, kw = make(case)
    rng = np.random.default_rng(1)
    dtype = jnp.dtype(float_dtype)

    def floats(slots, count):
        valid = np.arange(slots)[None, :] < np.asarray(count)[:, None]  # [b, slots]
        empty = ~valid[None, :, None, :, None]
        x, y = (np.where(empty, np.nan, rng.normal(size=(3, 2, 3, slots, 64))) for _ in range(2))
        return jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(valid)

    sink_k, sink_v, sink_valid = floats(4, [4, 2])
    window_k, window_v, window_valid = floats(128, [128, 7])
    stage_k, _, stage_valid = floats(32, [5, 31])
    packed = part_of(tier, layers=3, layer=2, **kw)
    stage = dataclasses.replace(packed, keys=stage_k, key_scale=None, key_zero=None, key_bits=cpu_attention.FLOATS,
                                valid=stage_valid, value_offset=jnp.asarray([64, 608], jnp.int32), layer=jnp.int32(1))
    parts = [cpu_attention.Part.floats(sink_k, sink_v, sink_valid, jnp.int32(0)),
             cpu_attention.Part.floats(window_k, window_v, window_valid, jnp.int32(2)), packed, stage]
    got = cpu_attention.attention_partials(q, parts, group_size=case.G, portable=portable)
    want = cpu_attention.attention_partials_reference(q, parts, group_size=case.G)
    assert np.all(np.isfinite(np.asarray(got.o)))
    assert_partials_close(got, want)


@pytest.mark.parametrize("case", [c for c in CASES if c.key_bits == c.value_bits and c.valid == "prefix"], ids=str)
def test_kernel_equals_attention_over_the_dequantized_tier(case):
    q, tier, kw = make(case)
    count = jnp.asarray(np.asarray(tier[-1]).sum(axis=1), jnp.int32)
    want = tier_attention_partials_dequantized(q, *tier[:6], count, bits=case.key_bits, group_size=case.G)
    got = cpu_attention.attention_partials(q, [part_of(tier, **kw)], group_size=case.G)
    assert_partials_close(got, want)


def test_kernel_runs_under_jit_scan_and_vmap():
    case = Case(2, 3, 3, 64, 160, 2, 2)
    q, tier, kw = make(case)
    want = cpu_attention.attention_partials_reference(q, [part_of(tier, **kw)], group_size=case.G)
    attend = lambda q, tier: cpu_attention.attention_partials(q, [part_of(tier, **kw)], group_size=case.G)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), (q, tier))
    scanned = jax.jit(lambda xs: jax.lax.scan(lambda _, x: (None, attend(*x)), None, xs)[1])(stacked)
    mapped = jax.vmap(attend)(*stacked)
    for out in (scanned, mapped):
        assert_partials_close(jax.tree_util.tree_map(lambda a: a[1], out), want)


def test_unsupported_shapes_are_refused():
    assert not cpu_attention.supported(24, 8, False)  # head dim not a multiple of 16
    assert not cpu_attention.supported(64, 4, False)  # 16 value groups per token
    assert cpu_attention.supported(64, 4, True)  # symmetric tiers have no groups
    q, tier, kw = make(Case(1, 1, 1, 64, 32, 2, 2))
    with pytest.raises(ValueError, match="multiples of 16"):
        cpu_attention.attention_partials(q, [part_of(tier, **kw)], group_size=4)
    with pytest.raises(ValueError, match="valid"):
        cpu_attention.attention_partials(q, [part_of(tier[:-1] + (tier[-1][:, :16],), **kw)], group_size=32)


def test_an_unusable_cache_folder_is_named_as_the_reason(tmp_path, monkeypatch):
    regular = tmp_path / "file"
    regular.write_text("x")
    monkeypatch.setenv("KVJAX_CACHE", str(regular / "sub"))  # under a file: no folder can be made
    reason = cpu_attention.unavailable_reason("kvjax_test_unusable_cache")  # a new target: not cached yet
    assert reason.startswith(f"cannot make the kernel's folder {regular / 'sub'}"), reason


@dataclasses.dataclass(frozen=True)
class FloatCase:
    b: int
    k: int
    g: int
    h: int
    c: int
    dtype: str = "float16"
    valid: str = "random"  # random | prefix | ring | none


FLOAT_CASES = [
    FloatCase(1, 3, 3, 64, 8192 - 1),  # SmolLM2-135M's heads, 16 blocks, the last one slot short of 512
    FloatCase(2, 3, 3, 64, 700, valid="prefix"),  # a block of 188 slots: 11 vectors of 16 and 12 slots
    FloatCase(2, 1, 4, 128, 37, "bfloat16"),  # two passes of 64 channels over the values
    FloatCase(1, 2, 1, 48, 21, "float32"),  # 3 vectors of channels: no pass of 64
    FloatCase(1, 2, 9, 16, 530, valid="ring"),  # items of 4 + 4 + 1 query heads, one vector of channels
    FloatCase(2, 1, 5, 96, 17),  # 64 + 32 channels
    FloatCase(2, 2, 2, 32, 40, valid="none"),
]


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("case", FLOAT_CASES, ids=str)
def test_float_parts_equal_reference(case, portable):
    """Float keys and values (what fp16 passes: its whole cache as one part, this step's slot masked
    out), any slot count and mask; every empty slot holds NaN or inf, which must not leak."""
    rng = np.random.default_rng(3)
    b, k, c, h = case.b, case.k, case.c, case.h
    valid = valid_slots(rng, b, c, case.valid, fraction=0.8, least=1)
    if case.valid != "none":
        valid[:, 0] = True
        if c > 1:
            valid[:, -1] = False  # this step's slot
    empty = ~valid[None, :, None, :, None]
    filler = np.where(rng.random((2, b, k, c, 1)) < 0.5, np.nan, np.inf)
    keys, values = (np.where(empty, filler, rng.normal(size=(2, b, k, c, h)) * 2) for _ in range(2))
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.normal(size=(b, k * case.g, h)), jnp.float32)
    part = cpu_attention.Part.floats(jnp.asarray(keys, dtype), jnp.asarray(values, dtype), jnp.asarray(valid),
                                     jnp.int32(1))
    got = cpu_attention.attention_partials(q, [part], group_size=32, portable=portable)
    clean = dataclasses.replace(part, keys=jnp.where(jnp.isfinite(part.keys), part.keys, 0),
                                values=jnp.where(jnp.isfinite(part.values), part.values, 0))
    want = cpu_attention.attention_partials_reference(q, [clean], group_size=32)
    assert np.all(np.isfinite(np.asarray(got.o))) and np.all(np.isfinite(np.asarray(got.l)))
    assert_partials_close(got, want)


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
def test_a_stage_reads_its_values_at_the_offset(portable):
    """A KIVI stage: float keys in their own buffer, values in the tier from value_offset (a different
    offset per row, at the tier's start, middle and end), beside the tier's own packed part."""
    case = Case(3, 3, 3, 64, 1024 + 64, 2, 2, valid="prefix")
    q, tier, kw = make(case, seed=5)
    rng = np.random.default_rng(6)
    stage_k = jnp.asarray(rng.normal(size=(2, 3, 3, 32, 64)) * 2, jnp.float16)
    packed = part_of(tier, layers=2, layer=1, **kw)
    for offsets in ([0, 512, 1024 + 32], [32, 1024 - 32, 7]):
        stage = dataclasses.replace(packed, keys=stage_k, key_scale=None, key_zero=None,
                                    key_bits=cpu_attention.FLOATS, valid=jnp.asarray(rng.random((3, 32)) < 0.6),
                                    value_offset=jnp.asarray(offsets, jnp.int32), layer=jnp.int32(0))
        for parts in ([stage], [packed, stage]):
            got = cpu_attention.attention_partials(q, parts, group_size=case.G, portable=portable)
            want = cpu_attention.attention_partials_reference(q, parts, group_size=case.G)
            assert_partials_close(got, want)


# --------------------------------------------------------------------------- a prompt chunk's queries

@dataclasses.dataclass(frozen=True)
class ChunkCase:
    b: int
    t: int
    n: int
    k: int
    h: int
    c: int
    mask: str = "causal"  # causal | random | window | intervals
    keys: str = "float16"
    values: str = "float16"


CHUNK_CASES = [
    ChunkCase(1, 40, 9, 3, 64, 1100),  # SmolLM2-135M's heads; a chunk at the end of 1100 slots
    ChunkCase(2, 33, 9, 3, 64, 300, "random"),  # holes anywhere; t, c no multiples of 16 or 64
    ChunkCase(1, 7, 2, 2, 16, 50, "window", "float32", "float32"),  # g = 1: 4 vectors of tokens per item
    ChunkCase(2, 50, 4, 2, 32, 130, "intervals", "bfloat16", "bfloat16"),  # g = 2
    ChunkCase(1, 20, 8, 2, 128, 65, "random", "float16", "float32"),  # g = 4; keys and values apart
    ChunkCase(2, 17, 5, 1, 48, 64, "intervals"),  # g = 5: items of 3 + 2 query heads
    ChunkCase(1, 3, 9, 1, 96, 200, "window", "float32", "float16"),  # g = 9: 3 items of 3
    ChunkCase(1, 3, 4, 1, 16, 1),  # one slot, seen by one query
]


def chunk_mask(rng, case: ChunkCase):
    """bool [b, t, c] of a pattern, with one query row (and, for b > 1, a whole row) that sees nothing."""
    b, t, c = case.b, case.t, case.c
    slot = np.arange(c)[None, None, :]
    pos = (c - t + np.arange(t))[None, :, None]  # the chunk's tokens are the last t slots
    lo, hi = np.sort(rng.integers(0, c + 1, (2, b, t, 1)), axis=0)
    mask = {"causal": slot <= pos,
            "random": rng.random((b, t, c)) < 0.6,
            "window": (slot <= pos) & (slot > pos - max(1, c // 3)),  # a token seen until it leaves
            "intervals": (slot >= lo) & (slot < hi)}[case.mask]
    mask = np.broadcast_to(mask, (b, t, c)).copy()
    mask[0, t // 2] = False
    if b > 1:
        mask[-1] = False
    return mask


def chunk_inputs(case: ChunkCase, seed=0, layers=2):
    """q [b, t, n, h], keys and values [layers, b, k, c, h] whose slots no query sees hold NaN or inf, the
    mask, and the same keys and values with those slots zeroed (for the reference)."""
    rng = np.random.default_rng(seed)
    b, k, c, h = case.b, case.k, case.c, case.h
    mask = chunk_mask(rng, case)
    unseen = ~mask.any(axis=1)[None, :, None, :, None]  # [1, b, 1, c, 1]
    filler = np.where(rng.random((layers, b, k, c, 1)) < 0.5, np.nan, np.inf)
    kv = [np.where(unseen, filler, rng.normal(size=(layers, b, k, c, h)) * 2) for _ in range(2)]
    keys, values = (jnp.asarray(x, jnp.dtype(d)) for x, d in zip(kv, (case.keys, case.values)))
    clean = [jnp.where(jnp.asarray(unseen), 0, x) for x in (keys, values)]
    q = jnp.asarray(rng.normal(size=(b, case.t, case.n, h)), jnp.float32)
    return q, keys, values, jnp.asarray(mask), clean


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
def test_chunk_kernel_equals_reference(case, portable):
    """The chunk kernel's partials equal xla_attention.chunk_partials' (reading layer 1 of [2, ...]
    arrays in place); a query that sees nothing gets m = EMPTY_MAX, l = 0, o = 0, and the NaN and inf
    of the slots no query sees never reach the output."""
    q, keys, values, mask, (clean_k, clean_v) = chunk_inputs(case)
    got = cpu_chunk_attention.chunk_partials(q, [(xla_attention.slices(keys, values, 1), mask)], portable=portable)
    want = xla_attention.chunk_partials(q, xla_attention.slices(clean_k, clean_v, 1), mask, kv_heads=case.k)
    for x in got:
        assert np.all(np.isfinite(np.asarray(x)))
    assert_partials_close(got, want)
    blind = ~np.asarray(mask).any(axis=2)  # [b, t]: queries that see nothing
    assert blind.any()
    assert np.all(np.asarray(got.m)[blind] == EMPTY_MAX) and np.all(np.asarray(got.l)[blind] == 0)
    assert np.all(np.asarray(got.o)[blind] == 0)


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
def test_chunk_kernel_continues_the_partials_it_is_given(portable):
    """Two calls over two halves of the slots, the second continuing the first's partials, and one call
    over the halves as two banks (one read at layer 1 of [2, ...] arrays whose layer 0 is NaN, one
    without a layer axis) equal one call over all."""
    case = ChunkCase(2, 21, 6, 2, 64, 260, "random")
    q, _, _, mask, (keys, values) = chunk_inputs(case, seed=1, layers=1)
    keys, values = keys[0], values[0]
    half = 100
    bank = lambda lo, hi: (xla_attention.slices(keys[:, :, lo:hi], values[:, :, lo:hi]), mask[:, :, lo:hi])
    call = functools.partial(cpu_chunk_attention.chunk_partials, portable=portable)
    whole = call(q, [bank(0, None)])
    assert_partials_close(call(q, [bank(half, None)], carry=call(q, [bank(0, half)])), whole)
    on_layer_1 = lambda x: jnp.stack([jnp.full_like(x, jnp.nan), x])
    second = (xla_attention.slices(on_layer_1(keys[:, :, half:]), on_layer_1(values[:, :, half:]), 1), mask[:, :, half:])
    assert_partials_close(call(q, [bank(0, half), second]), whole)


def test_chunk_banks_equal_reference():
    """A chunk's banks as kvjax.chunk passes them: arrays in memory (one call each) and a bank read a
    block at a time (a decoded tier: a call per block some query sees, here the middle one of three
    is seen by none and holds NaN), against xla_attention.banks_partials."""
    case = ChunkCase(1, 24, 9, 3, 64, 300)
    q, keys, values, mask, (clean_k, clean_v) = chunk_inputs(case, seed=2)
    rng = np.random.default_rng(3)
    tier_k, tier_v = (jnp.asarray(rng.normal(size=(1, 3, 96, 64)), jnp.float32) for _ in range(2))
    tier_mask = np.asarray(rng.random((1, 24, 96)) < 0.5)
    tier_mask[:, :, 32:64] = False
    nan = lambda x: x.at[:, :, 32:64].set(jnp.nan)
    decoded = lambda x: lambda start, size: tuple(y[:, :, start:start + size] for y in x)
    banks = [(xla_attention.slices(keys, values, 1), mask, 1024),
             (decoded((nan(tier_k), nan(tier_v))), jnp.asarray(tier_mask), 32)]
    clean = [(xla_attention.slices(clean_k, clean_v, 1), mask, 1024),
             (decoded((tier_k, tier_v)), jnp.asarray(tier_mask), 32)]
    got = jax.jit(lambda q: cpu_chunk_attention.banks_partials(q, banks, kv_heads=3))(q)
    assert np.all(np.isfinite(np.asarray(got.o)))
    assert_partials_close(got, xla_attention.banks_partials(q, clean, kv_heads=3))


def test_chunk_kernel_runs_under_vmap_and_refuses_what_it_cannot_take():
    case = ChunkCase(2, 9, 4, 2, 32, 70, "random")
    q, _, _, mask, (keys, values) = chunk_inputs(case, seed=4, layers=1)
    call = lambda q, k, v, m: cpu_chunk_attention.chunk_partials(q, [(xla_attention.slices(k, v), m)])
    want = call(q, keys[0], values[0], mask)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), (q, keys[0], values[0], mask))
    mapped = jax.vmap(call)(*stacked)
    assert_partials_close(jax.tree_util.tree_map(lambda a: a[1], mapped), want)
    assert not cpu_chunk_attention.supported(24) and not cpu_chunk_attention.supported(512)
    with pytest.raises(ValueError, match="multiples of 16"):
        call(q[..., :24], keys[0, ..., :24], values[0, ..., :24], mask)
    with pytest.raises(ValueError, match="do not fit"):
        call(q, keys[0], values[0], mask[:, :, :64])
