"""Kernels or references: the one place that decides, and the operations it decides between.

A quantized cache writes codes (grouped quantize + bit pack) and attends over them. Each operation
exists twice in `pallas_kernels`: a Pallas kernel and its pure-jnp reference, which is also the path
of every backend without the kernel. `Kernels` names the choice; AUTO is resolved by platform when
a cache is made (`resolve`) and the cache carries the result as a static field, so no layer asks
again (the RecurrentGemma `ScanType` pattern).

    REFERENCE  pure jnp / XLA (every backend)
    PALLAS     the compiled kernels: Triton on GPU (the GPU default), Mosaic on TPU (compiled TPU
               kernels are untested, so AUTO does not pick them there)
    INTERPRET  the kernels run by the Pallas interpreter (tests on a CPU)
    NATIVE     on a CPU, packed tiers attended by a C++ kernel through XLA's FFI
               (pallas_kernels.cpu_attention, compiled on first use; the CPU default where a
               C++ compiler is found); everything else as REFERENCE

`encoder(kernels, kind)` gives the row encoder, `fused_attention(kernels)` whether a packed tier
is attended by the fused Pallas kernel and `native_attention(kernels)` whether by the CPU kernel;
all read only the resolved value.
"""

from __future__ import annotations

import enum
import functools

import jax

from kvjax.errors import KvjaxError
from pallas_kernels import cpu_attention, quantize_pack


class Kernels(enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    PALLAS = "pallas"
    INTERPRET = "interpret"
    NATIVE = "native"


def resolve(kernels: Kernels | str = Kernels.AUTO, platform: str | None = None) -> Kernels:
    """AUTO -> PALLAS on GPU, NATIVE on a CPU where its kernel builds, else REFERENCE; PALLAS on a CPU
    and NATIVE elsewhere are errors."""
    try:
        kernels = Kernels(kernels)
    except ValueError:
        raise KvjaxError(f"unknown kernels {kernels!r}; known: {', '.join(k.value for k in Kernels)}") from None
    platform = platform or jax.default_backend()
    if kernels is Kernels.AUTO:
        if platform == "gpu":
            return Kernels.PALLAS
        return Kernels.NATIVE if platform == "cpu" and cpu_attention.available() else Kernels.REFERENCE
    if kernels is Kernels.PALLAS and platform == "cpu":
        raise KvjaxError("the Pallas kernels compile for GPU and TPU only; on a CPU use --kernels native, "
                         "interpret (the Pallas interpreter) or reference")
    if kernels is Kernels.NATIVE:
        if platform != "cpu":
            raise KvjaxError(f"the native kernel runs on a CPU only, not on {platform}")
        if not cpu_attention.available():
            raise KvjaxError(f"the native CPU kernel is unavailable: {cpu_attention.unavailable_reason()}")
    return kernels


_ENCODERS = {
    "values": (quantize_pack.encode_values, quantize_pack.encode_values_reference),
    "key_groups": (quantize_pack.encode_key_groups, quantize_pack.encode_key_groups_reference),
    "sym": (quantize_pack.encode_sym, quantize_pack.encode_sym_reference),
}


def encoder(kernels: Kernels, kind: str):
    """The row encoder `kind` ("values", "key_groups" or "sym") for a resolved choice; same signature and
    bit-identical outputs either way: f(x, bits, [group_size,] dtype)."""
    kernel, reference = _ENCODERS[kind]
    if kernels in (Kernels.REFERENCE, Kernels.NATIVE):
        return reference
    if kernels is Kernels.AUTO:
        raise ValueError("resolve Kernels.AUTO first (kvjax.kernels.resolve)")
    return functools.partial(kernel, interpret=kernels is Kernels.INTERPRET)


def fused_attention(kernels: Kernels) -> bool | None:
    """None: not the fused Pallas kernel; else its `interpret` flag."""
    if kernels in (Kernels.REFERENCE, Kernels.NATIVE):
        return None
    if kernels is Kernels.AUTO:
        raise ValueError("resolve Kernels.AUTO first (kvjax.kernels.resolve)")
    return kernels is Kernels.INTERPRET


def native_attention(kernels: Kernels) -> bool:
    """Whether packed tiers are attended by the C++ CPU kernel."""
    if kernels is Kernels.AUTO:
        raise ValueError("resolve Kernels.AUTO first (kvjax.kernels.resolve)")
    return kernels is Kernels.NATIVE
