"""x @ W^T with W in llama.cpp's block-quantized forms (Q4_0, Q4_1, Q8_0), read where it lies.

A GGUF file stores a weight matrix as N rows of K values in blocks of 32 along K, each block a
float16 scale (Q4_1: and a float16 minimum) and 32 small integers; `dequantize` gives the values
gguf's own dequantization gives (bit for bit: d * q is exact in float32). On a CPU, `matmul` is a
C++ kernel (cpu_matmul.cc, built and registered with the attention kernels: one library) that
converts each block in registers and multiplies it with float32 accumulation, so a decode step
reads the file's ~0.6 bytes per weight instead of float32's 4; its reference dequantizes with jnp
and lets XLA multiply. Stacked layers are read at `layer` in place, as the attention kernels do.
A decode step's few rows are multiplied block by block; a prompt chunk's many rows as a float GEMM
over panels of 32 weight rows converted once (as fast as XLA's float32 dot: BENCHMARKS.md).

    matmul(x, blocks, kind, *, layer=None) -> y         x float32 [m, K], blocks uint8 [(L,) N, K/32*B]
    matmul_reference(x, blocks, kind, *, layer=None)    the same through `dequantize` and XLA's dot
    dequantize(blocks, kind) -> float32 [..., K]        any leading shape
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_attention import MATMUL_TARGET, require, target

BLOCK = 32  # weights per block


class Kind(enum.IntEnum):
    """A block form, numbered as cpu_matmul.cc's `kind` attribute."""

    Q4_0 = 0  # float16 d, 16 bytes of 4-bit q: d * (q - 8)
    Q4_1 = 1  # float16 d, float16 m, 16 bytes of 4-bit q: d * q + m
    Q8_0 = 2  # float16 d, 32 int8 q: d * q

    @property
    def block_bytes(self) -> int:
        return {Kind.Q4_0: 18, Kind.Q4_1: 20, Kind.Q8_0: 34}[self]


def row_bytes(kind: Kind, k: int) -> int:
    """Bytes of a row of k weights (k a multiple of 32)."""
    return k // BLOCK * Kind(kind).block_bytes


def _half(two_bytes):
    """float16 [..., 2] bytes (little-endian) -> float32 [...]."""
    return jax.lax.bitcast_convert_type(two_bytes, jnp.float16).astype(jnp.float32)


def dequantize(blocks, kind: Kind):
    """uint8 [..., K/32 * block_bytes] -> float32 [..., K]: the values gguf.quants.dequantize gives."""
    kind = Kind(kind)
    lead, nbytes = blocks.shape[:-1], blocks.shape[-1]
    b = blocks.reshape(*lead, nbytes // kind.block_bytes, kind.block_bytes)
    d = _half(b[..., 0:2])[..., None]  # [..., blocks, 1]
    if kind is Kind.Q8_0:
        q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)  # [..., blocks, 32]
        return (d * q).reshape(*lead, -1)
    nibbles = b[..., 4:] if kind is Kind.Q4_1 else b[..., 2:]  # [..., blocks, 16]
    q = jnp.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(jnp.int32)  # elements 0-15, 16-31
    if kind is Kind.Q4_0:
        return (d * (q - 8).astype(jnp.float32)).reshape(*lead, -1)
    return (d * q.astype(jnp.float32) + _half(b[..., 2:4])[..., None]).reshape(*lead, -1)


def _layer_of(blocks, layer):
    """(blocks [L, N, B], layer int32 []) for blocks [N, B] (layer 0) or [L, N, B] at `layer`."""
    if blocks.ndim == 2:
        return blocks[None], jnp.int32(0)
    return blocks, jnp.asarray(layer, jnp.int32)


def matmul_reference(x, blocks, kind: Kind, *, layer=None):
    """x float32 [m, K] @ W^T -> float32 [m, N], W = dequantize(blocks at `layer`): XLA's dot."""
    stacked, at = _layer_of(blocks, layer)
    w = dequantize(jax.lax.dynamic_index_in_dim(stacked, at, keepdims=False), kind)  # [N, K]
    return jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w)


@functools.partial(jax.jit, static_argnames=("kind", "portable"))
def matmul(x, blocks, kind: Kind, *, layer=None, portable: bool = False):
    """x float32 [m, K] @ W^T -> float32 [m, N] through the C++ kernel, the blocks read in place at
    `layer` of [L, N, B] (or [N, B] whole). `portable`: the build without vector extensions (tests)."""
    kind = Kind(kind)
    stacked, at = _layer_of(blocks, layer)
    m, k = x.shape
    if k % BLOCK or stacked.shape[2] != row_bytes(kind, k) or stacked.dtype != jnp.uint8:
        raise ValueError(f"{kind.name} blocks {blocks.shape} {blocks.dtype} do not hold rows of x's {k} values")
    require(portable)
    out = jax.ShapeDtypeStruct((m, stacked.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target(MATMUL_TARGET, portable), out, vmap_method="sequential")(
        at.reshape(1), x.astype(jnp.float32), stacked, kind=np.int32(kind))
