"""Attention of a prompt chunk's queries on a CPU: a C++ kernel (cpu_chunk_attention.cc) through XLA's FFI.

A prompt is prefilled in chunks of t tokens, and each layer attends the chunk's t queries per row
over what its cache holds plus the chunk, through masks [b, t, c] saying which query sees which slot
(causal, a window a token leaves, a tier until its group moves on). XLA's version,
`xla_attention.chunk_partials`, is two batched matmuls a block of 1024 slots at a time; the kernel
computes the same flash-decoding partials flash-attention style: queries held transposed in
registers and L1, keys and values converted once per block of 64 slots and shared by all query
heads of their kv head, online softmax, blocks no query of a tile sees skipped, on both cores of
XLA's intra-op pool. It reads float16, bfloat16 or float32 keys and values, the keys and the values
each at their own layer of an [L, ...] array, in place, from several banks in one call (the queries
and partials are moved in and out once a call: ~0.8 ms at 1024 tokens of SmolLM2-135M).

    chunk_partials(q, banks, *, carry=None) -> Partials
        one call: q [b, t, n, h] over banks of float keys and values in memory, each (Slices, mask
        [b, t, c]: which query sees which of its slots), continuing the partials `carry` (o [b, t,
        n, h], m and l [b, t, n])
    banks_partials(q, banks, *, kv_heads) -> Partials
        `xla_attention.banks_partials` (its reference) through the kernel: every bank of arrays in
        memory (`xla_attention.Slices`) in one call, a bank read block by block (a tier decoded) a
        call per block some query sees, each call continuing the last one's partials

The kernel is built and registered with the decode kernel (cpu_attention: one library).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import xla_attention as xla
from pallas_kernels.cpu_attention import CHUNK_TARGET, require, target

MAX_HEAD = 256


def supported(head_dim: int) -> bool:
    """Whether the kernel takes this head dim (a multiple of 16 up to 256; others: XLA)."""
    return head_dim % 16 == 0 and 0 < head_dim <= MAX_HEAD


@functools.partial(jax.jit, static_argnames=("portable",))
def chunk_partials(q, banks, *, carry=None, portable: bool = False) -> xla.Partials:
    """Partials of q [b, t, n, h] over `banks`, each (xla_attention.Slices: float keys and values
    [b, k, c, h], or [L, b, k, c, h] read at its layer; mask bool [b, t, c]: the slots each query
    sees), merged with `carry` (the partials of what the queries saw before; None: nothing). Slots
    no query sees may hold anything, NaN included. `portable`: the build without vector extensions
    (for tests)."""
    b, t, n, h = q.shape
    if not supported(h):
        raise ValueError(f"the CPU chunk kernel takes head dims that are multiples of 16 up to {MAX_HEAD}, not {h}")
    require(portable)
    in_layers = lambda x, layer: (x[None], jnp.int32(0)) if x.ndim == 4 else (x, jnp.asarray(layer, jnp.int32))
    operands, layers = [], []
    for read, mask in banks:
        (keys, key_layer), (values, value_layer) = in_layers(read.keys, read.layer), in_layers(read.values, read.layer)
        k = keys.shape[2]
        if keys.shape[1:] != (b, k, mask.shape[2], h) or values.shape[1:] != keys.shape[1:] \
                or mask.shape[:2] != (b, t) or not k or n % k:
            raise ValueError(f"keys {keys.shape}, values {values.shape} and mask {mask.shape} do not fit q {q.shape}")
        operands += [keys, values, mask.astype(jnp.bool_)]
        layers += [key_layer, value_layer]
    carry = xla.empty_partials(b, t, n, h) if carry is None else carry
    if not banks:
        return carry
    shapes = [jax.ShapeDtypeStruct((b, t, n, h), jnp.float32), jax.ShapeDtypeStruct((b, t, n), jnp.float32),
              jax.ShapeDtypeStruct((b, t, n), jnp.float32)]
    o, m, l = jax.ffi.ffi_call(target(CHUNK_TARGET, portable), shapes, vmap_method="sequential",
                               input_output_aliases={2: 0, 3: 1, 4: 2})(
        jnp.stack(layers), q.astype(jnp.float32), *(x.astype(jnp.float32) for x in carry), *operands,
        sm_scale=np.float32(h ** -0.5))
    return xla.Partials(o, m, l)


def banks_partials(q, banks, *, kv_heads: int, portable: bool = False) -> xla.Partials:
    """Partials of a chunk's queries q [b, t, n, h] over the union of `banks`, each (read, mask [b, t, c],
    block) as `xla_attention.chunk_partials` takes them: what `xla_attention.banks_partials` computes."""
    in_memory = [(read, mask) for read, mask, _ in banks if isinstance(read, xla.Slices)]
    out = chunk_partials(q, in_memory, portable=portable)  # arrays in memory: read where they lie, whole
    for read, mask, block in banks:
        if isinstance(read, xla.Slices):
            continue
        for start in range(0, mask.shape[2], block):  # a block at a time, if some query sees it
            size = min(block, mask.shape[2] - start)
            seen = mask[:, :, start:start + size]
            attend = functools.partial(lambda start, size, seen, carry: chunk_partials(
                q, [(xla.slices(*read(start, size)), seen)], carry=carry, portable=portable), start, size, seen)
            out = lax.cond(jnp.any(seen), attend, lambda carry: carry, out)
    return out


# The kernel's reference: the same partials in XLA.
chunk_partials_reference = xla.chunk_partials
banks_partials_reference = xla.banks_partials
