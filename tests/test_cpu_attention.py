"""The C++ CPU kernel (pallas_kernels.cpu_attention) against its jnp reference.

Random keys/values are encoded with pallas_kernels.quantize_pack; the kernel and the reference
attend over the same codes (and float parts), so they agree to float32 rounding (the kernel sums
in another order and uses its own exp). Both builds are checked: the one with this CPU's vector extensions (what
kvjax uses) and the portable one. Shapes: b batch, k kv heads, g query heads per kv head, h head
dim, c slots, G group size.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_attention
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
