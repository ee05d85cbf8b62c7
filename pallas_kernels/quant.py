"""Quantization primitives for KV caches (pure jax.numpy, jittable).

Conventions:
    * `bits` is one of VALID_BITS = (2, 4, 8); `bits`, `axis` and `group_size` are Python
      ints (static under jax.jit).
    * All arithmetic is float32 whatever the input dtype; scales and zeros are float32.
    * Asymmetric (KIVI): x ~ codes * scale + zero with zero = min, scale = (max - min) / (2**bits - 1),
      codes uint8 in [0, 2**bits - 1]. Keys are grouped per channel (G tokens of one channel),
      values per token (G consecutive channels of one token).
    * Symmetric: x ~ codes * scale with scale = max|x| / (2**(bits-1) - 1), codes int8 in
      [-(2**(bits-1) - 1), 2**(bits-1) - 1]; `sym_to_unsigned` offsets them for packing.
    * A group with zero range (or zero max|x|) gets scale 0 and codes 0, so it is reconstructed
      exactly (no NaN/inf).
    * Packing stores 32 // bits codes per uint32 word along the last axis, first code in the
      lowest bits.
    Shape letters: t tokens, h head dim, G group size, n codes, w words.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

VALID_BITS = (2, 4, 8)


def check_bits(bits) -> int:
    """Returns `bits` as an int, or raises ValueError unless it is one of VALID_BITS."""
    try:
        value = operator.index(bits)
    except TypeError:
        value = None
    if value is None or isinstance(bits, bool) or value not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return value


def check_group_size(group_size) -> int:
    """Returns `group_size` as an int, or raises ValueError unless it is a positive int."""
    try:
        value = operator.index(group_size)
    except TypeError:
        value = 0
    if value <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return value


def _check_ndim(x, name: str):
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [..., t, h] (at least 2 dims), got shape {x.shape}")


def _safe(scale):
    """Scale with zeros replaced by 1, for division (those groups have numerator 0)."""
    return jnp.where(scale > 0, scale, 1.0)


# --------------------------------------------------------------------------- asymmetric


def quantize_asym(x, bits: int, axis: int):
    """Min/max quantization; the whole extent of `axis` is one group.

    x [..., a, ...] -> codes uint8 [..., a, ...], scale/zero float32 [..., 1, ...].
    """
    bits = check_bits(bits)
    qmax = 2**bits - 1
    x = jnp.asarray(x, jnp.float32)
    zero = jnp.min(x, axis=axis, keepdims=True)
    scale = (jnp.max(x, axis=axis, keepdims=True) - zero) / qmax
    codes = jnp.clip(jnp.round((x - zero) / _safe(scale)), 0, qmax).astype(jnp.uint8)
    return codes, scale, zero


def dequantize_asym(codes, scale, zero, dtype=jnp.float32):
    """codes * scale + zero (broadcasting), cast to `dtype`."""
    return (codes.astype(jnp.float32) * scale + zero).astype(dtype)


def quantize_keys_per_channel(k, bits: int, group_size: int):
    """KIVI keys: one group of G tokens per channel.

    k [..., t, h] with t == G -> codes uint8 [..., t, h], scale/zero float32 [..., 1, h].
    """
    check_bits(bits)
    group_size = check_group_size(group_size)
    k = jnp.asarray(k)
    _check_ndim(k, "keys")
    if k.shape[-2] != group_size:
        raise ValueError(f"per-channel key quantization needs exactly group_size={group_size} tokens "
                         f"(axis -2), got shape {k.shape}")
    return quantize_asym(k, bits, axis=-2)


def dequantize_keys_per_channel(codes, scale, zero, dtype=jnp.float32):
    """Inverse of quantize_keys_per_channel: codes [..., t, h], scale/zero [..., 1, h] -> [..., t, h]."""
    return dequantize_asym(codes, scale, zero, dtype)


def quantize_values_per_token(v, bits: int, group_size: int):
    """KIVI values: groups of G consecutive channels of one token.

    v [..., t, h] with h % G == 0 -> codes uint8 [..., t, h], scale/zero float32 [..., t, h // G].
    """
    check_bits(bits)
    group_size = check_group_size(group_size)
    v = jnp.asarray(v)
    _check_ndim(v, "values")
    *lead, t, h = v.shape
    if h % group_size:
        raise ValueError(f"per-token value quantization needs head_dim (axis -1) divisible by "
                         f"group_size={group_size}, got shape {v.shape}")
    grouped = v.reshape(*lead, t, h // group_size, group_size)  # [..., t, h/G, G]
    codes, scale, zero = quantize_asym(grouped, bits, axis=-1)  # scale/zero [..., t, h/G, 1]
    return codes.reshape(v.shape), scale[..., 0], zero[..., 0]


def dequantize_values_per_token(codes, scale, zero, group_size: int, dtype=jnp.float32):
    """Inverse of quantize_values_per_token: codes [..., t, h], scale/zero [..., t, h // G] -> [..., t, h]."""
    group_size = check_group_size(group_size)
    _check_ndim(codes, "codes")
    *lead, t, h = codes.shape
    if h % group_size:
        raise ValueError(f"codes last axis must be divisible by group_size={group_size}, got shape {codes.shape}")
    grouped = codes.reshape(*lead, t, h // group_size, group_size)  # [..., t, h/G, G]
    out = dequantize_asym(grouped, scale[..., None], zero[..., None], dtype)
    return out.reshape(codes.shape)


# --------------------------------------------------------------------------- symmetric


def quantize_sym(x, bits: int, axis: int = -1):
    """Symmetric absmax quantization; the whole extent of `axis` is one group.

    x [..., a, ...] -> codes int8 [..., a, ...], scale float32 [..., 1, ...].
    """
    bits = check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    x = jnp.asarray(x, jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / qmax
    codes = jnp.clip(jnp.round(x / _safe(scale)), -qmax, qmax).astype(jnp.int8)
    return codes, scale


def dequantize_sym(codes, scale, dtype=jnp.float32):
    """codes * scale (broadcasting), cast to `dtype`."""
    return (codes.astype(jnp.float32) * scale).astype(dtype)


def sym_to_unsigned(codes, bits: int):
    """Signed codes int8 -> uint8 codes + 2**(bits-1), in [1, 2**bits - 1], ready for `pack`."""
    bits = check_bits(bits)
    return (codes.astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8)


def unsigned_to_sym(ucodes, bits: int):
    """Inverse of sym_to_unsigned: uint8 -> int8 codes - 2**(bits-1)."""
    bits = check_bits(bits)
    return (ucodes.astype(jnp.int32) - 2 ** (bits - 1)).astype(jnp.int8)


# --------------------------------------------------------------------------- bit packing


def packed_length(n: int, bits: int) -> int:
    """Number of uint32 words holding n codes of `bits` bits (n must fill whole words)."""
    bits = check_bits(bits)
    per_word = 32 // bits
    if n % per_word:
        raise ValueError(f"cannot pack {n} codes of {bits} bits: length must be a multiple of {per_word}")
    return n // per_word


def pack(codes, bits: int):
    """Packs codes uint8 [..., n] (values < 2**bits) into uint32 [..., n * bits // 32]."""
    bits = check_bits(bits)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"pack needs integer codes, got dtype {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("pack needs at least one axis")
    per_word = 32 // bits
    words = packed_length(codes.shape[-1], bits)
    lanes = codes.reshape(*codes.shape[:-1], words, per_word).astype(jnp.uint32)  # [..., w, 32/bits]
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)  # [32/bits]
    fields = (lanes & jnp.uint32(2**bits - 1)) << shifts  # disjoint bit fields of each word
    # One OR-reduce rather than 32/bits slices, shifts and ORs: a few ops to trace and compile.
    return jax.lax.reduce(fields, jnp.uint32(0), jax.lax.bitwise_or, (fields.ndim - 1,))  # [..., w]


def unpack(words, bits: int):
    """Inverse of pack: uint32 [..., w] -> uint8 [..., w * 32 // bits]."""
    bits = check_bits(bits)
    words = jnp.asarray(words)
    if words.ndim < 1:
        raise ValueError("unpack needs at least one axis")
    per_word = 32 // bits
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)  # [32/bits]
    lanes = (words.astype(jnp.uint32)[..., None] >> shifts) & jnp.uint32(2**bits - 1)  # [..., w, 32/bits]
    return lanes.reshape(*words.shape[:-1], words.shape[-1] * per_word).astype(jnp.uint8)
