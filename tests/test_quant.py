"""Tests for pallas_kernels.quant: error bounds, constant groups, bit packing, validation, jit."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import quant

SETTINGS = settings(max_examples=30, deadline=None)
BITS = st.sampled_from(quant.VALID_BITS)


# Jitted round trips: one compile per (shape, bits, group) instead of one per eager op.
@partial(jax.jit, static_argnums=(1, 2))
def keys_round_trip(k, bits, group):
    codes, scale, zero = quant.quantize_keys_per_channel(k, bits, group)
    return codes, scale, zero, quant.dequantize_keys_per_channel(codes, scale, zero)


@partial(jax.jit, static_argnums=(1, 2))
def values_round_trip(v, bits, group):
    codes, scale, zero = quant.quantize_values_per_token(v, bits, group)
    return codes, scale, zero, quant.dequantize_values_per_token(codes, scale, zero, group)


@partial(jax.jit, static_argnums=(1,))
def sym_round_trip(x, bits):
    codes, scale = quant.quantize_sym(x, bits)
    return codes, scale, quant.dequantize_sym(codes, scale)


@partial(jax.jit, static_argnums=(1,))
def pack_round_trip(codes, bits):
    packed = quant.pack(codes, bits)
    return packed, quant.unpack(packed, bits)


@st.composite
def float_arrays(draw, t=None, h=None):
    """float32 array [b, t, h] with values of magnitude spanning 1e-3..1e3, plus a random offset."""
    b = draw(st.integers(1, 2))
    t = t if t is not None else draw(st.sampled_from([1, 2, 4, 8]))
    h = h if h is not None else draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = 10.0 ** draw(st.floats(-3, 3))
    offset = draw(st.sampled_from([0.0, 1.0, -5.0]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, t, h)) + offset) * magnitude
    return x.astype(np.float32)


def assert_within_half_step(x, deq, scale):
    """|x - deq| <= scale / 2 elementwise, plus a tiny float32 slack."""
    x = np.asarray(x, np.float64)
    deq = np.asarray(deq, np.float64)
    scale = np.broadcast_to(np.asarray(scale, np.float64), x.shape)
    slack = 1e-6 * np.max(np.abs(x)) + 1e-5 * scale
    err = np.abs(x - deq)
    assert np.all(np.isfinite(deq))
    assert np.all(err <= scale / 2 + slack), f"max excess {np.max(err - scale / 2 - slack)}"


# --------------------------------------------------------------------------- asymmetric


@SETTINGS
@given(bits=BITS, data=st.data())
def test_keys_per_channel_error_bound(bits, data):
    group = data.draw(st.sampled_from([1, 2, 4, 8]))
    k = data.draw(float_arrays(t=group))
    codes, scale, zero, deq = keys_round_trip(k, bits, group)
    b, t, h = k.shape
    assert codes.shape == (b, t, h) and codes.dtype == jnp.uint8
    assert scale.shape == zero.shape == (b, 1, h)
    assert scale.dtype == zero.dtype == jnp.float32
    assert int(codes.max()) <= 2**bits - 1
    assert_within_half_step(k, deq, scale)
    # Group min maps to code 0, group max to the top code.
    c = np.asarray(codes)
    assert np.all(c.min(axis=-2) == 0)
    nonconst = np.asarray(scale)[:, 0, :] > 0
    assert np.all(c.max(axis=-2)[nonconst] == 2**bits - 1)


@SETTINGS
@given(bits=BITS, data=st.data())
def test_values_per_token_error_bound(bits, data):
    group = data.draw(st.sampled_from([1, 2, 4, 8]))
    h = group * data.draw(st.sampled_from([1, 2, 4]))
    v = data.draw(float_arrays(h=h))
    codes, scale, zero, deq = values_round_trip(v, bits, group)
    b, t, _ = v.shape
    assert codes.shape == (b, t, h) and codes.dtype == jnp.uint8
    assert scale.shape == zero.shape == (b, t, h // group)
    assert deq.shape == v.shape
    assert_within_half_step(v, deq, np.repeat(np.asarray(scale), group, axis=-1))


def test_asym_bfloat16_input_and_output_dtype():
    x = jnp.linspace(-3, 5, 64, dtype=jnp.float32).reshape(2, 4, 8)
    codes, scale, zero = quant.quantize_asym(x.astype(jnp.bfloat16), 4, axis=-1)
    assert scale.dtype == zero.dtype == jnp.float32
    deq = quant.dequantize_asym(codes, scale, zero, dtype=jnp.bfloat16)
    assert deq.dtype == jnp.bfloat16
    assert_within_half_step(x.astype(jnp.bfloat16).astype(jnp.float32), deq.astype(jnp.float32), scale + 0.05)


@pytest.mark.parametrize("bits", quant.VALID_BITS)
@pytest.mark.parametrize("const", [0.0, -3.25, 7.5, 1e30, -1e-30])
def test_asym_constant_groups_exact(bits, const):
    # Keys: every channel constant over its tokens; channel 1 is random so groups mix.
    k = np.full((2, 4, 8), const, np.float32)
    k[:, :, 1] = np.random.default_rng(0).standard_normal((2, 4))
    codes, scale, zero = quant.quantize_keys_per_channel(k, bits, 4)
    deq = np.asarray(quant.dequantize_keys_per_channel(codes, scale, zero))
    assert np.all(np.isfinite(deq)) and np.all(np.isfinite(scale))
    assert np.all(np.asarray(codes)[:, :, [0] + list(range(2, 8))] == 0)
    np.testing.assert_array_equal(deq[:, :, 0], k[:, :, 0])
    np.testing.assert_array_equal(deq[:, :, 2:], k[:, :, 2:])
    # Values: every group of 4 channels constant.
    v = np.full((2, 3, 8), const, np.float32)
    codes, scale, zero = quant.quantize_values_per_token(v, bits, 4)
    assert np.all(np.asarray(scale) == 0) and np.all(np.asarray(codes) == 0)
    np.testing.assert_array_equal(quant.dequantize_values_per_token(codes, scale, zero, 4), v)


# --------------------------------------------------------------------------- symmetric


@SETTINGS
@given(bits=BITS, x=float_arrays())
def test_sym_error_bound(bits, x):
    codes, scale, deq = sym_round_trip(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == jnp.int8 and codes.shape == x.shape
    assert scale.shape == x.shape[:-1] + (1,) and scale.dtype == jnp.float32
    assert int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) <= qmax
    assert_within_half_step(x, deq, scale)


@pytest.mark.parametrize("bits", quant.VALID_BITS)
@pytest.mark.parametrize("const", [0.0, -2.5, 4.0])
def test_sym_constant_rows(bits, const):
    x = np.full((3, 16), const, np.float32)
    x[1] = 0.0  # an all-zero row next to non-zero ones
    codes, scale = quant.quantize_sym(x, bits)
    deq = np.asarray(quant.dequantize_sym(codes, scale))
    assert np.all(np.isfinite(deq)) and np.all(np.isfinite(scale))
    np.testing.assert_array_equal(deq[1], 0.0)
    np.testing.assert_array_equal(np.asarray(codes)[1], 0)
    # A constant row is +-absmax everywhere, which symmetric quantization hits exactly.
    np.testing.assert_allclose(deq, x, rtol=1e-6)


@pytest.mark.parametrize("bits", quant.VALID_BITS)
def test_sym_unsigned_round_trip(bits):
    qmax = 2 ** (bits - 1) - 1
    codes = jnp.arange(-qmax, qmax + 1, dtype=jnp.int8)
    u = quant.sym_to_unsigned(codes, bits)
    assert u.dtype == jnp.uint8
    assert int(u.min()) >= 0 and int(u.max()) <= 2**bits - 1
    np.testing.assert_array_equal(quant.unsigned_to_sym(u, bits), codes)
    # Unsigned codes survive packing.
    n = 32 // bits * 2
    padded = jnp.resize(u, (n,))
    np.testing.assert_array_equal(quant.unpack(quant.pack(padded, bits), bits), padded)


# --------------------------------------------------------------------------- packing


@SETTINGS
@given(bits=BITS, words=st.integers(1, 6), lead=st.sampled_from([(), (3,), (2, 2)]),
       seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip(bits, words, lead, seed):
    n = words * 32 // bits
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=lead + (n,), dtype=np.uint8)
    codes.reshape(-1)[rng.integers(codes.size)] = 2**bits - 1  # never all zeros
    packed, unpacked = pack_round_trip(codes, bits)
    assert packed.dtype == jnp.uint32 and packed.shape == lead + (quant.packed_length(n, bits),)
    assert unpacked.dtype == jnp.uint8
    np.testing.assert_array_equal(unpacked, codes)


def test_pack_bit_layout():
    two = np.zeros(16, np.uint8)
    two[:3] = [1, 2, 3]
    assert int(quant.pack(two, 2)[0]) == 1 | 2 << 2 | 3 << 4  # 57
    two[:] = 0
    two[15] = 3
    assert int(quant.pack(two, 2)[0]) == 0xC0000000
    four = np.arange(1, 9, dtype=np.uint8)
    assert int(quant.pack(four, 4)[0]) == 0x87654321
    eight = np.array([1, 2, 3, 0xFF, 0x10, 0, 0, 0x80], np.uint8)
    np.testing.assert_array_equal(quant.pack(eight, 8), np.array([0xFF030201, 0x80000010], np.uint32))
    full = np.full(16, 3, np.uint8)
    assert int(quant.pack(full, 2)[0]) == 0xFFFFFFFF
    np.testing.assert_array_equal(quant.unpack(np.array([0x87654321], np.uint32), 4), four)


def test_packed_length():
    assert quant.packed_length(128, 2) == 8
    assert quant.packed_length(128, 4) == 16
    assert quant.packed_length(128, 8) == 32


# --------------------------------------------------------------------------- validation


def test_invalid_inputs():
    x = np.ones((4, 8), np.float32)
    for bad in (3, 16, 0, 2.0, True):
        with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\)"):
            quant.check_bits(bad)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quant.quantize_asym(x, 3, axis=-1)
    with pytest.raises(ValueError, match="got 3"):
        quant.quantize_sym(x, 3)
    with pytest.raises(ValueError, match="got 3"):
        quant.quantize_keys_per_channel(x, 3, 4)
    with pytest.raises(ValueError, match="got 16"):
        quant.pack(np.zeros(32, np.uint8), 16)
    with pytest.raises(ValueError, match="got 16"):
        quant.unpack(np.zeros(2, np.uint32), 16)
    with pytest.raises(ValueError, match="got 3"):
        quant.sym_to_unsigned(np.zeros(4, np.int8), 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        quant.pack(np.zeros(20, np.uint8), 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        quant.packed_length(12, 4)
    with pytest.raises(ValueError, match="integer codes"):
        quant.pack(np.zeros(16, np.float32), 2)
    with pytest.raises(ValueError, match="group_size=8 tokens"):
        quant.quantize_keys_per_channel(x, 4, 8)
    with pytest.raises(ValueError, match="divisible by group_size=3"):
        quant.quantize_values_per_token(x, 4, 3)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quant.quantize_values_per_token(x, 4, 0)
    with pytest.raises(ValueError, match="at least 2 dims"):
        quant.quantize_values_per_token(np.ones(8, np.float32), 4, 4)


# --------------------------------------------------------------------------- jit


def test_jit_matches_eager():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 3, 16, 8)).astype(np.float32) * 10
    v = rng.standard_normal((2, 3, 5, 16)).astype(np.float32)

    def keys(k, bits, group):
        codes, scale, zero = quant.quantize_keys_per_channel(k, bits, group)
        return quant.pack(jnp.swapaxes(codes, -1, -2), bits), scale, zero, quant.dequantize_keys_per_channel(
            codes, scale, zero)

    def values(v, bits, group):
        codes, scale, zero = quant.quantize_values_per_token(v, bits, group)
        return quant.pack(codes, bits), quant.dequantize_values_per_token(codes, scale, zero, group)

    def sym(x, bits):
        codes, scale = quant.quantize_sym(x, bits)
        return quant.pack(quant.sym_to_unsigned(codes, bits), bits), quant.dequantize_sym(codes, scale)

    for bits in quant.VALID_BITS:
        for fn, args in ((keys, (k, bits, 16)), (values, (v, bits, 4)), (sym, (v, bits))):
            eager = fn(*args)
            jitted = jax.jit(fn, static_argnums=tuple(range(1, len(args))))(*args)
            for a, b in zip(eager, jitted):
                assert a.dtype == b.dtype and a.shape == b.shape
                if jnp.issubdtype(a.dtype, jnp.integer):  # codes / packed words: bit-exact
                    np.testing.assert_array_equal(a, b)
                else:  # jit may fuse multiply-add (FMA): allow an ulp or so
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(a))))
