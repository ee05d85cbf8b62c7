"""Which kernels a cache runs: the choice, resolved once, as an object every cache holds.

A cache writes codes (grouped quantize + bit pack) and, in a decode step, attends one query per
sequence over the parts of a layer (pallas_kernels.xla_attention.Part: a sink, a window, the step's
token, packed tiers, a KIVI stage). `Kernels` names the choice (`--kernels`); `resolve` turns it
into a `Backend` when a cache is made, and the cache carries it as a static field, so no layer asks
again (the RecurrentGemma `ScanType` pattern). Every backend encodes bit-identically and attends to
float32 rounding of the others (tests/test_policies.py, tests/test_cpu_attention.py).

    REFERENCE  `Backend`: pure jnp / XLA for everything (every platform)
    PALLAS     `Pallas`: the Pallas encoders, and the fused Pallas kernel for packed tiers filled in
               order (Triton on GPU, the GPU default; Mosaic on TPU, untested there, so AUTO does
               not pick it); the other parts through XLA
    INTERPRET  `Pallas(interpret=True)`: the same kernels run by the Pallas interpreter (tests on a CPU)
    NATIVE     `Native`: on a CPU, every part of a layer in one call of the C++ kernel
               (pallas_kernels.cpu_attention, compiled on first use; the CPU default where a C++
               compiler is found), and a prompt chunk's queries through the C++ chunk kernel
               (pallas_kernels.cpu_chunk_attention); the encoders through XLA

A prompt chunk's many queries (kvjax.chunk, kvjax.cache) are attended by `chunk_partials` over
float banks with masks: XLA's blocked matmuls (`xla_attention.chunk_partials`) in every backend but
Native.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax

from kvjax.errors import KvjaxError
from pallas_kernels import cpu_attention, cpu_chunk_attention, quantize_pack
from pallas_kernels import decode_attention as pallas_attention
from pallas_kernels import xla_attention as xla


class Kernels(enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    PALLAS = "pallas"
    INTERPRET = "interpret"
    NATIVE = "native"


# What a prompt chunk's attention holds at once (`Backend.chunk_bytes`), from the compiled programs'
# memory analysis and measured peaks (tests/test_memory.py; BENCHMARKS.md, "peak memory").
SCORE_COPIES = 4  # XLA: float32 [b, n, t, block] arrays of one block of slots
MASK_COPIES = 4  # the C++ kernel: bool [b, t, c] masks of a layer's banks

_ENCODERS = {
    "values": (quantize_pack.encode_values, quantize_pack.encode_values_reference),
    "key_groups": (quantize_pack.encode_key_groups, quantize_pack.encode_key_groups_reference),
    "sym": (quantize_pack.encode_sym, quantize_pack.encode_sym_reference),
}


@dataclasses.dataclass(frozen=True)
class Backend:
    """The XLA backend (REFERENCE); the others override what they run faster. Hashable: a static field."""

    kernels = Kernels.REFERENCE

    def encoder(self, kind: str):
        """The row encoder `kind` ("values", "key_groups" or "sym"); same signature and bit-identical
        outputs in every backend: f(x, bits, [group_size,] dtype)."""
        return _ENCODERS[kind][1]

    def partials(self, q, parts, *, group_size: int) -> xla.Partials:
        """Flash-decoding partials of q [b, n, h] over the union of the parts' valid slots."""
        return xla.attention_partials(q, parts, group_size=group_size)

    def attend(self, q, parts, *, group_size: int):
        """Softmax attention of q [b, n, h] over the union of the parts -> float32 [b, n, h]."""
        return xla.merge_partials([self.partials(q, parts, group_size=group_size)])

    def chunk_partials(self, q, banks, *, kv_heads: int) -> xla.Partials:
        """Flash-decoding partials of a prompt chunk's queries q [b, t, n, h] over the union of `banks`,
        each (read, mask [b, t, c], block) as `xla_attention.chunk_partials` takes them."""
        return xla.banks_partials(q, banks, kv_heads=kv_heads)

    def chunk_bytes(self, batch: int, queries: int, heads: int, slots: int, head_dim: int) -> int:
        """What `chunk_partials` holds at once for `queries` per row over `slots`: XLA's float32 scores
        [b, n, t, block] of one block of slots, SCORE_COPIES of them."""
        return batch * heads * queries * min(xla.CHUNK_SLOTS, slots) * 4 * SCORE_COPIES


@dataclasses.dataclass(frozen=True)
class Pallas(Backend):
    """The Pallas encoders and fused tier kernel; `interpret` runs them in the Pallas interpreter;
    `platform` ("gpu" or "tpu") compiles them for that platform instead of this host's (to lower a
    program for TPU on a CPU host: jax.export)."""

    interpret: bool = False
    platform: str | None = None

    @property
    def kernels(self):
        return Kernels.INTERPRET if self.interpret else Kernels.PALLAS

    def encoder(self, kind):
        return functools.partial(_ENCODERS[kind][0], interpret=self.interpret, backend=self.platform)

    def partials(self, q, parts, *, group_size):
        fused = [p for p in parts if _fused_kernel_reads(p)]
        rest = [p for p in parts if not _fused_kernel_reads(p)]
        out = [_fused_partials(q, p, group_size, self.interpret, self.platform) for p in fused]
        if rest:
            out.append(xla.attention_partials(q, rest, group_size=group_size))
        return xla.combine_partials(out)


def _fused_kernel_reads(p: xla.Part) -> bool:
    """The fused kernel reads packed tiers filled in order, keys and values at one width."""
    return p.packed and p.key_bits == p.value_bits and p.count is not None and p.value_offset is None


def _fused_partials(q, p: xla.Part, group_size: int, interpret: bool, platform: str | None) -> xla.Partials:
    at = lambda x: None if x is None else x[p.layer]  # the kernel takes one layer's [b, k, c, ...]
    keys = at(p.keys)
    blocks = pallas_attention.auto_blocks(q.shape[0], keys.shape[1], keys.shape[2])
    return pallas_attention.tier_attention_partials(
        q, keys, at(p.key_scale), at(p.key_zero), at(p.values), at(p.value_scale), at(p.value_zero), p.count,
        bits=p.key_bits, group_size=group_size, blocks=blocks, interpret=interpret, backend=platform)


@dataclasses.dataclass(frozen=True)
class Native(Backend):
    """The C++ CPU kernel: every part it takes in one call per layer, the others through XLA."""

    kernels = Kernels.NATIVE

    def partials(self, q, parts, *, group_size):
        h = q.shape[-1]
        takes = lambda p: cpu_attention.supported(h, group_size, p.symmetric or not p.packed)
        parts = [p for p in parts if p.keys.shape[3]]  # a part of no slots adds nothing
        native, rest = [p for p in parts if takes(p)], [p for p in parts if not takes(p)]
        out = [cpu_attention.attention_partials(q, native, group_size=group_size)] if native else []
        if rest:
            out.append(xla.attention_partials(q, rest, group_size=group_size))
        return xla.combine_partials(out) if out else xla.empty_partials(*q.shape)

    def chunk_partials(self, q, banks, *, kv_heads):
        if not cpu_chunk_attention.supported(q.shape[-1]):
            return super().chunk_partials(q, banks, kv_heads=kv_heads)
        return cpu_chunk_attention.banks_partials(q, banks, kv_heads=kv_heads)

    def chunk_bytes(self, batch, queries, heads, slots, head_dim):
        """The kernel holds no scores: the banks' masks (bool [b, t, c], MASK_COPIES of the cache's
        slots) and the partials (float32 o, m, l per query head, and their carry)."""
        if not cpu_chunk_attention.supported(head_dim):
            return super().chunk_bytes(batch, queries, heads, slots, head_dim)
        return batch * queries * (slots * MASK_COPIES + heads * (head_dim + 2) * 4 * 2)


def resolve(kernels: Kernels | str | Backend = Kernels.AUTO, platform: str | None = None) -> Backend:
    """The backend of a choice: AUTO -> PALLAS on GPU, NATIVE on a CPU where its kernel builds, else
    REFERENCE; PALLAS on a CPU and NATIVE elsewhere are errors (a KvjaxError saying what to use)."""
    if isinstance(kernels, Backend):
        return kernels
    try:
        kernels = Kernels(kernels)
    except ValueError:
        raise KvjaxError(f"unknown kernels {kernels!r}; known: {', '.join(k.value for k in Kernels)}") from None
    platform = platform or jax.default_backend()
    if kernels is Kernels.AUTO:
        if platform == "gpu":
            kernels = Kernels.PALLAS
        else:
            kernels = Kernels.NATIVE if platform == "cpu" and cpu_attention.available() else Kernels.REFERENCE
    if kernels is Kernels.PALLAS and platform == "cpu":
        raise KvjaxError("the Pallas kernels compile for GPU and TPU only; on a CPU use --kernels native, "
                         "interpret (the Pallas interpreter) or reference")
    if kernels is Kernels.NATIVE:
        if platform != "cpu":
            raise KvjaxError(f"the native kernel runs on a CPU only, not on {platform}")
        if not cpu_attention.available():
            raise KvjaxError(f"the native CPU kernel is unavailable: {cpu_attention.unavailable_reason()}")
    return {Kernels.REFERENCE: Backend(), Kernels.PALLAS: Pallas(), Kernels.INTERPRET: Pallas(interpret=True),
            Kernels.NATIVE: Native()}[kernels]
