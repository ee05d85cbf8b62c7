"""KV row codecs: fused grouped quantize + bit pack (one Pallas kernel each), their references, decoders.

Each program reads a block of rows in the input dtype, computes the group min/max (or absmax)
in float32, quantizes, packs 32 / bits codes per uint32 word and writes codes, scales and zeros,
so a 16-bit K/V row is read once and its float32 codes never reach memory. The outputs are
bit-identical to the pure-jnp references below (same float32 operations in the same order, round
half to even).

Notation (kvjax/docs/DESIGN.md letters): c tokens, h head dim, G group size, w = h * bits / 32
code words per row, per = 32 / bits codes per word, R rows = prod(leading dims) * c (leading dims
are flattened into rows), BR rows per program.

Public functions (jitted; `interpret=True`, or a `pltpu.InterpretParams()` for the TPU interpreter,
runs the kernel in the Pallas interpreter on any backend; `backend="gpu"` / `"tpu"` picks the
compiled path for another platform than jax.default_backend(), e.g. to lower for TPU on a CPU host):
    encode_values(v, bits, G, dtype)      v [..., c, h] -> codes uint32 [..., c, w],
                                          scale, zero [..., c, h/G] (`dtype`); per token, groups
                                          of G consecutive channels.
    encode_key_groups(k, bits, G, dtype)  k [..., c, h], c % G == 0 -> codes uint32 [..., c, w],
                                          scale, zero [..., c/G, h]; per channel, groups of G
                                          consecutive tokens.
    encode_sym(x, bits, dtype)            x [..., c, h] -> codes uint32 [..., c, w] (codes offset
                                          by 2**(bits-1)), scale [..., c, 1]; symmetric per token.
Each has its pure-jnp reference (`*_reference`, the ground truth and the path of backends without
the kernel), and `decode_values`, `decode_key_groups`, `decode_sym` read codes back (pure jnp).
Math (pallas_kernels.quant): asymmetric zero = min, scale = (max - min) / (2**bits - 1),
codes = clip(round((x - zero) / safe(scale)), 0, 2**bits - 1) with safe(0) = 1; symmetric
scale = max|x| / (2**(bits-1) - 1), codes = clip(round(x / safe(scale)), -q, q) + 2**(bits-1).
Code d of a row goes to word d // per, bits (d % per) * bits (first code in the lowest bits).

Kernel: grid (R_pad / BR,), BR from `plan_block_rows`; program i reads x rows [i*BR, (i+1)*BR) as a [BR, h] block and
writes codes [BR, w] and its block of scales/zeros ([BR, h/G] values, [BR/G, h] keys, [BR, 1]
sym). Groups are formed by reshapes ([BR, h/G, G] or [BR/G, G, h]) and reduced with min/max.
Packing reshapes the int32 codes to [BR, w, per], shifts lane j left by j * bits and sums over
the lanes (a sum of disjoint bit fields is their OR; int32 arithmetic wraps like uint32, and
Mosaic TPU has no unsigned reductions), then bitcasts to uint32. R is padded with zero rows to a
multiple of BR (whole key groups: BR % G == 0), and the outputs are sliced back.

Backends: the kernels compile for GPU (Pallas Triton) and TPU (Mosaic); which of kernel and
reference runs is decided by the caller (kvjax.kernels), never here.
  * Triton: block shapes are powers of two, so h and G must be powers of two (ValueError
    otherwise) and a single-block grid pads R to the next power of two. Triton has no lowering
    for lax.round, so the kernel rounds with inline PTX (cvt.rni.f32.f32, half to even): CUDA
    only, no ROCm. Float32 division is Triton's default `/` (not IEEE-rounded), which matched
    XLA GPU's division in the codecs bit for bit on an H100 (jax 0.11.2, ~10M codes), while
    the IEEE div.rn.f32 (inline PTX) flipped a few codes per million: keep the plain `/`.
  * Scales: XLA rewrites the codecs' division by the constant 2**bits - 1 into a multiplication
    by its float32 reciprocal (on every backend), so the kernel multiplies by that reciprocal.
  * TPU: the block's two minor dims are full array dims or multiples of (8, 128): rows per
    block are a multiple of 8, and for keys BR / G is a multiple of 8 unless the grid has one
    block. The group and packing reshapes split the lane (minor) dim ([BR, h] -> [BR, w, per]
    etc.); the TPU interpreter runs them, but they are untested on real TPUs and may need a
    relayout Mosaic does not support (fallback: pack with an exact f32 matmul against a
    [h, w] matrix of powers of two, in two 16-bit halves). Mosaic's f32 division
    ((x - zero) / scale) is not known to match XLA TPU's to the ulp, which would flip a rare
    code at a rounding boundary; the compiled TPU path is untested (tests/test_tpu_lowering.py
    lowers it for TPU from a CPU host: Pallas -> Mosaic, not Mosaic's own compile).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import quant


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class PackBlocks:
    """Static tiling of the kernels (hashable: a jit static argument).

    block_rows: BR, rows per program (a power of two >= 8). Raised to G for keys (whole groups
        per block) and, on TPU with more than one block, to 8 * G (key scale blocks [BR/G, h]
        need BR / G % 8 == 0). Lowered when all rows fit in one block.
    num_warps, num_stages: Triton compiler parameters (ignored elsewhere).
    Defaults from an H100 sweep (jax 0.11.2, bf16 [32, 8, 8192, 64], 268 MB in): BR 64 and 4 warps
    ran values / sym at about 2.0 / 1.8 TB/s of input and keys (G = 32) at 1.4 TB/s, 2-5x the
    XLA codecs; keys slow down at BR >= 128 or 8 warps, and ran fastest at BR 32 with 2 warps
    (137 us vs 186 us, G = 32).
    """

    block_rows: int = 64
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_rows", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PackBlocks.{name} must be a positive int, got {value!r}")
        if not _is_pow2(self.block_rows) or self.block_rows < 8:
            raise ValueError(f"PackBlocks.block_rows must be a power of two >= 8, got {self.block_rows}")


def _is_tpu_interpret(interpret) -> bool:
    from jax.experimental.pallas import tpu as pltpu

    return isinstance(interpret, pltpu.InterpretParams)


def kernel_target(interpret, backend: str | None = None) -> str:
    """The code path of a kernel (here and in decode_attention): 'triton', 'tpu' (compiled Mosaic
    or the TPU interpreter) or 'interpret' (the HLO interpreter).

    `backend` is the platform the kernel is compiled for, "gpu" or "tpu"; None means
    jax.default_backend(), and an interpret value overrides it. Name it to lower for another
    platform than the host's, e.g. jax.export(..., platforms=("tpu",)) on a CPU host.
    """
    if _is_tpu_interpret(interpret):
        return "tpu"
    if interpret:
        return "interpret"
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "triton"
    if backend == "tpu":
        return "tpu"
    raise ValueError(f"the Pallas kernels have no compiled path on backend {backend!r}; "
                     f"pass interpret=True (or backend='gpu' / 'tpu' to lower for that platform)")


def _check(x, bits: int, group_size: int | None, kind: str):
    """Validates a [..., c, h] input; returns (bits, group_size, lead, c, h)."""
    bits = quant.check_bits(bits)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{kind} must have shape [..., c, h] (at least 2 dims), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{kind} must be floating point, got dtype {x.dtype}")
    *lead, c, h = x.shape
    per = 32 // bits
    if h % per:
        raise ValueError(f"cannot pack head_dim={h} codes of {bits} bits: head_dim (axis -1) must be a "
                         f"multiple of {per}, got shape {x.shape}")
    if group_size is not None:
        group_size = quant.check_group_size(group_size)
        if kind == "values" and h % group_size:
            raise ValueError(f"per-token value quantization needs head_dim (axis -1) divisible by "
                             f"group_size={group_size}, got shape {x.shape}")
        if kind == "keys" and c % group_size:
            raise ValueError(f"per-channel key quantization needs tokens (axis -2) divisible by "
                             f"group_size={group_size}, got shape {x.shape}")
    return bits, group_size, tuple(lead), c, h


def _check_triton(h: int, group_size: int | None):
    if not _is_pow2(h):
        raise ValueError(f"the Triton quantize-pack kernel needs a power-of-two head_dim, got {h}")
    if group_size is not None and not _is_pow2(group_size):
        raise ValueError(f"the Triton quantize-pack kernel needs a power-of-two group_size, got {group_size}")


def plan_block_rows(rows: int, unit: int, blocks: PackBlocks, target: str) -> int:
    """BR, the rows per program the kernels tile `rows` rows into on `target` (kernel_target's 'triton',
    'tpu' or 'interpret'): a multiple of `unit` (G for keys, else 1); see PackBlocks."""
    br = max(unit, blocks.block_rows // unit * unit)
    if rows <= br:  # one block: full array dims (Triton: a power of two, rows are padded)
        return _next_pow2(rows) if target == "triton" else rows
    if target == "tpu" and unit > 1 and (br // unit) % 8:
        br = 8 * unit
        if rows <= br:
            return rows
    return br


# --------------------------------------------------------------------------- kernel math


def _round(x, triton: bool):
    """Round half to even in float32, like jnp.round (Triton has no lowering for lax.round)."""
    if not triton:
        return lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN)
    from jax.experimental.pallas import triton as plgpu

    [out] = plgpu.elementwise_inline_asm("cvt.rni.f32.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return out


def _reciprocal(qmax: int):
    """float32(1 / qmax), rounded once. XLA's algebraic simplifier rewrites the codecs' division by
    the constant qmax into this multiplication (on every backend, jitted or eager), so the kernel
    multiplies too: a true division differs from the codecs by an ulp in ~half the scales."""
    return np.float32(1.0) / np.float32(qmax)


def _safe(scale):
    return jnp.where(scale > 0, scale, 1.0)


def _asym(x, zero, hi, qmax: int, triton: bool):
    """Codes (float32, integral) and scale of x given its group min `zero` and max `hi` (broadcastable)."""
    scale = (hi - zero) * _reciprocal(qmax)
    codes = jnp.clip(_round((x - zero) / _safe(scale), triton), 0.0, float(qmax))
    return codes, scale


def _pack(codes, bits: int):
    """float32 integral codes [r, h] (in [0, 2**bits)) -> uint32 words [r, h * bits / 32]."""
    r, h = codes.shape
    per = 32 // bits
    lanes = codes.astype(jnp.int32).reshape(r, h // per, per)  # [r, w, per]
    shifts = lax.broadcasted_iota(jnp.int32, (1, 1, per), 2) * bits  # [1, 1, per]
    words = jnp.sum(lax.shift_left(lanes, jnp.broadcast_to(shifts, lanes.shape)), axis=2)  # disjoint: sum == OR
    return lax.bitcast_convert_type(words, jnp.uint32)  # [r, w]


def _values_kernel(x_ref, codes_ref, scale_ref, zero_ref, *, bits: int, group_size: int, triton: bool):
    # x_ref [BR, h]; codes_ref [BR, w]; scale_ref, zero_ref [BR, h/G]
    br, h = x_ref.shape
    G = group_size
    x = x_ref[...].astype(jnp.float32).reshape(br, h // G, G)  # [BR, h/G, G]
    zero = jnp.min(x, axis=2)  # [BR, h/G]
    hi = jnp.max(x, axis=2)
    codes, scale = _asym(x, zero[:, :, None], hi[:, :, None], 2**bits - 1, triton)  # [BR, h/G, G], [BR, h/G, 1]
    codes_ref[...] = _pack(codes.reshape(br, h), bits)
    scale_ref[...] = scale.reshape(br, h // G).astype(scale_ref.dtype)
    zero_ref[...] = zero.astype(zero_ref.dtype)


def _keys_kernel(x_ref, codes_ref, scale_ref, zero_ref, *, bits: int, group_size: int, triton: bool):
    # x_ref [BR, h]; codes_ref [BR, w]; scale_ref, zero_ref [BR/G, h]
    br, h = x_ref.shape
    G = group_size
    x = x_ref[...].astype(jnp.float32).reshape(br // G, G, h)  # [BR/G, G, h]
    zero = jnp.min(x, axis=1)  # [BR/G, h]
    hi = jnp.max(x, axis=1)
    codes, scale = _asym(x, zero[:, None, :], hi[:, None, :], 2**bits - 1, triton)  # [BR/G, G, h], [BR/G, 1, h]
    codes_ref[...] = _pack(codes.reshape(br, h), bits)
    scale_ref[...] = scale.reshape(br // G, h).astype(scale_ref.dtype)
    zero_ref[...] = zero.astype(zero_ref.dtype)


def _sym_kernel(x_ref, codes_ref, scale_ref, *, bits: int, triton: bool):
    # x_ref [BR, h]; codes_ref [BR, w]; scale_ref [BR, 1]
    qmax = 2 ** (bits - 1) - 1
    x = x_ref[...].astype(jnp.float32)  # [BR, h]
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [BR, 1]
    scale = amax * _reciprocal(qmax)
    codes = jnp.clip(_round(x / _safe(scale), triton), -float(qmax), float(qmax))
    codes_ref[...] = _pack(codes + float(2 ** (bits - 1)), bits)
    scale_ref[...] = scale.astype(scale_ref.dtype)


# --------------------------------------------------------------------------- pallas_call


def _encode_pallas_call(x2, *, kind: str, bits: int, group_size: int | None, dtype, blocks: PackBlocks,
                        interpret, backend: str | None):
    """x2 [R, h] -> codes uint32 [R, w] and scale (and zero): [R, h/G] values, [R/G, h] keys, [R, 1] sym."""
    rows, h = x2.shape
    w = h * bits // 32
    target = kernel_target(interpret, backend)
    if rows == 0:  # nothing to encode (a zero-size grid)
        sides = {"values": [(0, h // (group_size or 1))] * 2, "keys": [(0, h)] * 2, "sym": [(0, 1)]}[kind]
        return [jnp.zeros((0, w), jnp.uint32)] + [jnp.zeros(s, dtype) for s in sides]
    if target == "triton":
        _check_triton(h, group_size)
    unit = group_size if kind == "keys" else 1
    br = plan_block_rows(rows, unit, blocks, target)
    padded = pl.cdiv(rows, br) * br
    if padded != rows:
        x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))  # zero rows: scale 0, no NaN; sliced off below
    triton = target == "triton"
    row_block = lambda minor: pl.BlockSpec((br, minor), lambda i: (i, 0))
    if kind == "values":
        kernel = functools.partial(_values_kernel, bits=bits, group_size=group_size, triton=triton)
        side = [row_block(h // group_size)] * 2
        side_shape = [jax.ShapeDtypeStruct((padded, h // group_size), dtype)] * 2
    elif kind == "keys":
        kernel = functools.partial(_keys_kernel, bits=bits, group_size=group_size, triton=triton)
        side = [pl.BlockSpec((br // group_size, h), lambda i: (i, 0))] * 2
        side_shape = [jax.ShapeDtypeStruct((padded // group_size, h), dtype)] * 2
    else:
        kernel = functools.partial(_sym_kernel, bits=bits, triton=triton)
        side = [row_block(1)]
        side_shape = [jax.ShapeDtypeStruct((padded, 1), dtype)]
    compiler_params = None
    if triton:
        # Triton explicitly: with no compiler_params, jax >= 0.10 lowers to Mosaic GPU by default.
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    elif target == "tpu" and not interpret:
        from jax.experimental.pallas import tpu as pltpu

        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",))
    outs = pl.pallas_call(
        kernel,
        grid=(padded // br,),
        in_specs=[row_block(h)],
        out_specs=[row_block(w), *side],
        out_shape=[jax.ShapeDtypeStruct((padded, w), jnp.uint32), *side_shape],
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"quantize_pack_{kind}",
    )(x2)
    if padded != rows:
        per_group = group_size if kind == "keys" else 1
        outs = [outs[0][:rows]] + [o[: rows // per_group] for o in outs[1:]]
    return outs


# --------------------------------------------------------------------------- jitted kernel paths

_STATIC = ("bits", "group_size", "dtype", "blocks", "interpret", "backend")


@functools.partial(jax.jit, static_argnames=_STATIC)
def encode_values(v, bits: int, group_size: int, dtype, *, blocks: PackBlocks = PackBlocks(), interpret=False,
                  backend: str | None = None):
    """KIVI values, per token: v [..., c, h] -> (codes uint32 [..., c, w], scale, zero [..., c, h/G])."""
    bits, group_size, lead, c, h = _check(v, bits, group_size, "values")
    codes, scale, zero = _encode_pallas_call(
        v.reshape(-1, h), kind="values", bits=bits, group_size=group_size, dtype=jnp.dtype(dtype),
        blocks=blocks, interpret=interpret, backend=backend)
    G = group_size
    return (codes.reshape(*lead, c, h * bits // 32), scale.reshape(*lead, c, h // G),
            zero.reshape(*lead, c, h // G))


@functools.partial(jax.jit, static_argnames=_STATIC)
def encode_key_groups(k, bits: int, group_size: int, dtype, *, blocks: PackBlocks = PackBlocks(),
                      interpret=False, backend: str | None = None):
    """KIVI keys, per channel in groups of G tokens: k [..., c, h] -> (codes [..., c, w], scale, zero
    [..., c/G, h])."""
    bits, group_size, lead, c, h = _check(k, bits, group_size, "keys")
    codes, scale, zero = _encode_pallas_call(  # groups never straddle rows of different leading index
        k.reshape(-1, h), kind="keys", bits=bits, group_size=group_size, dtype=jnp.dtype(dtype),
        blocks=blocks, interpret=interpret, backend=backend)
    G = group_size
    return (codes.reshape(*lead, c, h * bits // 32), scale.reshape(*lead, c // G, h),
            zero.reshape(*lead, c // G, h))


@functools.partial(jax.jit, static_argnames=("bits", "dtype", "blocks", "interpret", "backend"))
def encode_sym(x, bits: int, dtype, *, blocks: PackBlocks = PackBlocks(), interpret=False,
               backend: str | None = None):
    """Symmetric per token: x [..., c, h] -> (codes uint32 [..., c, w], scale [..., c, 1])."""
    bits, _, lead, c, h = _check(x, bits, None, "x")
    codes, scale = _encode_pallas_call(x.reshape(-1, h), kind="sym", bits=bits, group_size=None,
                                       dtype=jnp.dtype(dtype), blocks=blocks, interpret=interpret, backend=backend)
    return codes.reshape(*lead, c, h * bits // 32), scale.reshape(*lead, c, 1)


# --------------------------------------------------------------------------- references


def encode_values_reference(v, bits: int, group_size: int, dtype):
    """Pure jnp `encode_values`: v [..., c, h] -> (codes uint32 [..., c, w], scale, zero [..., c, h/G])."""
    codes, scale, zero = quant.quantize_values_per_token(v, bits, group_size)
    return quant.pack(codes, bits), scale.astype(dtype), zero.astype(dtype)


def encode_key_groups_reference(k, bits: int, group_size: int, dtype):
    """Pure jnp `encode_key_groups`: k [..., c, h] (c % G == 0) -> (codes [..., c, w], scale, zero [..., c/G, h])."""
    *lead, c, h = k.shape
    groups = k.reshape(*lead, c // group_size, group_size, h)  # [..., c/G, G, h]
    codes, scale, zero = quant.quantize_keys_per_channel(groups, bits, group_size)
    return (quant.pack(codes.reshape(*lead, c, h), bits), scale[..., 0, :].astype(dtype),
            zero[..., 0, :].astype(dtype))


def encode_sym_reference(x, bits: int, dtype):
    """Pure jnp `encode_sym`: x [..., c, h] -> (codes uint32 [..., c, w], scale [..., c, 1])."""
    codes, scale = quant.quantize_sym(x, bits, axis=-1)
    return quant.pack(quant.sym_to_unsigned(codes, bits), bits), scale.astype(dtype)


# --------------------------------------------------------------------------- decoders (pure jnp)


def decode_values(codes, scale, zero, bits: int, group_size: int, dtype):
    """codes [..., c, w], scale/zero [..., c, h/G] -> values [..., c, h]."""
    return quant.dequantize_values_per_token(quant.unpack(codes, bits), scale.astype(jnp.float32),
                                             zero.astype(jnp.float32), group_size, dtype)


def decode_key_groups(codes, scale, zero, bits: int, group_size: int, dtype):
    """codes [..., c, w], scale/zero [..., c/G, h] -> keys [..., c, h]."""
    *lead, c, _ = codes.shape
    unpacked = quant.unpack(codes, bits)
    h = unpacked.shape[-1]
    groups = unpacked.reshape(*lead, c // group_size, group_size, h)
    out = quant.dequantize_keys_per_channel(groups, scale.astype(jnp.float32)[..., None, :],
                                            zero.astype(jnp.float32)[..., None, :], dtype)
    return out.reshape(*lead, c, h)


def decode_sym(codes, scale, bits: int, dtype):
    """codes [..., c, w], scale [..., c, 1] -> x [..., c, h]."""
    signed = quant.unsigned_to_sym(quant.unpack(codes, bits), bits)
    return quant.dequantize_sym(signed, scale.astype(jnp.float32), dtype)
