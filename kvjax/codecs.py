"""KV row codecs: what a quantized tier stores for keys and values, and how it is read back.

Both the step-by-step cache (kvjax.tiered) and the exact teacher-forced path
(kvjax.teacher_forced) call these functions, so the two store bit-identical codes.
Codes are bit-packed along the head dim: [..., c, h] -> uint32 [..., c, h * bits / 32].
Scales and zeros are kept in the cache's 16-bit dtype (`dtype`).

  KIVI (asymmetric): keys per channel in groups of G tokens (scale/zero [..., c/G, h]),
                     values per token in groups of G channels (scale/zero [..., c, h/G]).
  Symmetric (selective int8): keys and values per token over the whole head dim
                     (scale [..., c, 1], no zero).
"""

from __future__ import annotations

import jax.numpy as jnp

from kvjax import quant


def encode_values(v, bits: int, group_size: int, dtype):
    """KIVI values, per token: v [..., c, h] -> (codes uint32 [..., c, w], scale, zero [..., c, h/G])."""
    codes, scale, zero = quant.quantize_values_per_token(v, bits, group_size)
    return quant.pack(codes, bits), scale.astype(dtype), zero.astype(dtype)


def decode_values(codes, scale, zero, bits: int, group_size: int, dtype):
    return quant.dequantize_values_per_token(quant.unpack(codes, bits), scale.astype(jnp.float32),
                                             zero.astype(jnp.float32), group_size, dtype)


def encode_key_groups(k, bits: int, group_size: int, dtype):
    """KIVI keys, per channel: k [..., c, h] (c % G == 0) -> (codes [..., c, w], scale, zero [..., c/G, h])."""
    *lead, c, h = k.shape
    groups = k.reshape(*lead, c // group_size, group_size, h)  # [..., c/G, G, h]
    codes, scale, zero = quant.quantize_keys_per_channel(groups, bits, group_size)
    return (quant.pack(codes.reshape(*lead, c, h), bits), scale[..., 0, :].astype(dtype),
            zero[..., 0, :].astype(dtype))


def decode_key_groups(codes, scale, zero, bits: int, group_size: int, dtype):
    """codes [..., c, w], scale/zero [..., c/G, h] -> keys [..., c, h]."""
    *lead, c, _ = codes.shape
    unpacked = quant.unpack(codes, bits)
    h = unpacked.shape[-1]
    groups = unpacked.reshape(*lead, c // group_size, group_size, h)
    out = quant.dequantize_keys_per_channel(groups, scale.astype(jnp.float32)[..., None, :],
                                            zero.astype(jnp.float32)[..., None, :], dtype)
    return out.reshape(*lead, c, h)


def encode_sym(x, bits: int, dtype):
    """Symmetric per token: x [..., c, h] -> (codes uint32 [..., c, w], scale [..., c, 1])."""
    codes, scale = quant.quantize_sym(x, bits, axis=-1)
    return quant.pack(quant.sym_to_unsigned(codes, bits), bits), scale.astype(dtype)


def decode_sym(codes, scale, bits: int, dtype):
    signed = quant.unsigned_to_sym(quant.unpack(codes, bits), bits)
    return quant.dequantize_sym(signed, scale.astype(jnp.float32), dtype)
