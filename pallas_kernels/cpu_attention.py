"""Decode attention over one packed tier on a CPU: a C++ kernel called through XLA's FFI.

XLA:CPU has no Pallas backend, and its fusions of the jnp reference (decode_attention's
`kivi_key_scores` and `kivi_value_mix`) unpack each code twice and run far below memory speed.
cpu_attention.cc reads each packed word once: per slot it unpacks the codes (shift, mask, convert)
and multiplies them by q with the key scale folded in, and by the probabilities with the value
scale folded in. It returns the same flash-decoding partials as the Pallas kernel, over the slots
where `valid` is set (any pattern, so rings too), for KIVI and symmetric tiers, keys and values at
their own widths in {2, 4, 8}.

The library is compiled on first use with the machine's C++ compiler (g++ or $CXX) against the
FFI headers jaxlib ships, for the vector instructions /proc/cpuinfo lists, and cached under
$KVJAX_CACHE (default ~/.cache/kvjax) by a digest of the source, flags and jaxlib version.
`available()` says whether that worked; kvjax.kernels decides from it, once.

    packed_attention_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, valid, layer=None, *,
                              key_bits, value_bits, group_size, symmetric) -> Partials
    (with `layer`, the tier arrays are a cache's whole [L, ...] arrays and that layer is read in place)
    reference: packed_attention_partials_reference (decode_attention's jnp functions), same signature.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels import decode_attention as da

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "kvjax_packed_attention"


def _vector_flags(vector: bool = True) -> list[str]:
    """Compiler flags for the vector extensions this CPU reports (none on other architectures, or
    without `vector`: the portable build the tests also check)."""
    if not vector or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return []
    out = []
    if {"avx2", "fma", "f16c"} <= flags:
        out += ["-mavx2", "-mfma", "-mf16c"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    return out


def _compile_command(out: Path, vector: bool = True) -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    # Reassociation lets the dot products and sums vectorize; no finite-math assumptions (masks use EMPTY_MAX).
    return [cxx, "-std=c++17", "-O3", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math",
            "-fno-signed-zeros", "-fno-trapping-math", *_vector_flags(vector), f"-I{jax.ffi.include_dir()}",
            str(SOURCE), "-o", str(out)]


def _library(vector: bool = True) -> Path:
    """The compiled kernel library, built if this source, these flags and this jaxlib have none yet."""
    command = _compile_command(Path("OUT"), vector)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode() + jaxlib.__version__.encode()).hexdigest()
    cache = Path(os.environ.get("KVJAX_CACHE") or Path.home() / ".cache" / "kvjax")
    path = cache / f"cpu_attention-{key[:16]}.so"
    if not path.exists():
        print("[kvjax] compiling the CPU attention kernel (once, about 30 s)", file=sys.stderr, flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: no half-written library
            built = Path(tmp) / path.name
            subprocess.run(_compile_command(built, vector), check=True, capture_output=True, text=True)
            os.replace(built, path)
    return path


@functools.cache
def _registered(target: str = TARGET, vector: bool = True) -> str | None:
    """Builds and registers the kernel once under `target`: None when ready, else why not (one line)."""
    try:
        library = ctypes.CDLL(str(_library(vector)))
    except FileNotFoundError as e:
        return f"no C++ compiler ({e.filename})"
    except subprocess.CalledProcessError as e:
        return "compiling cpu_attention.cc failed: " + (e.stderr.strip().splitlines() or ["?"])[-1]
    except OSError as e:
        return f"loading the compiled kernel failed: {e}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.KvjaxPackedAttention), platform="cpu")
    return None


def available() -> bool:
    """Whether the CPU kernel is built and registered (builds it on first call)."""
    return _registered() is None


def unavailable_reason() -> str | None:
    return _registered()


def supported(head_dim: int, group_size: int, symmetric: bool) -> bool:
    """Whether the kernel takes tiers of this head dim and group size (the rest use the reference)."""
    return head_dim % 16 == 0 and head_dim <= 256 and (symmetric or (head_dim % group_size == 0 and
                                                                     head_dim // group_size <= 8))


def _check(q, k_codes, v_codes, valid, key_bits, value_bits, group_size, symmetric):
    b, n, h = q.shape
    _, k, c, _ = k_codes.shape
    if k_codes.shape[-1] * 32 // key_bits != h or v_codes.shape[-1] * 32 // value_bits != h:
        raise ValueError(f"codes {k_codes.shape} / {v_codes.shape} do not hold {h} channels at {key_bits} / "
                         f"{value_bits} bits")
    if valid.shape != (b, c) or n % k:
        raise ValueError(f"valid {valid.shape} for {b} rows x {c} slots, {n} query heads over {k} kv heads")
    if not supported(h, group_size, symmetric):
        raise ValueError(f"the CPU kernel takes head dims that are multiples of 16 up to 256, and at least "
                         f"{h // 8} channels per value group; not {h} and {group_size}")
    return b, k, n // k, h


@functools.partial(jax.jit, static_argnames=("key_bits", "value_bits", "group_size", "symmetric", "portable"))
def packed_attention_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, valid, layer=None, *,
                              key_bits: int, value_bits: int, group_size: int, symmetric: bool = False,
                              portable: bool = False) -> da.Partials:
    """Partials of q [b, n, h] over the valid [b, c] slots of a packed tier (the C++ kernel).

    KIVI: k_scale/k_zero [b, k, c/G, h], v_scale/v_zero [b, k, c, h/G]; symmetric: k_scale, v_scale
    [b, k, c, 1] and the zeros None. With `layer` (an int32 scalar), every tier array has a leading
    [L] axis and layer `layer` is attended, read where it lies (a decode step's layer scan passes
    the whole cache arrays: slicing them would copy the layer out). `portable`: the build without
    vector extensions (for tests)."""
    if layer is None:
        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = (
            None if a is None else a[None] for a in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero))
        layer = 0
    b, k, g, h = _check(q, k_codes[0], v_codes[0], valid, key_bits, value_bits, group_size, symmetric)
    target = TARGET + "_portable" if portable else TARGET
    reason = _registered(target, not portable)
    if reason is not None:
        raise RuntimeError(f"the CPU attention kernel is unavailable: {reason}")
    if symmetric:
        k_zero, v_zero = k_scale, v_scale  # not read
    shapes = [jax.ShapeDtypeStruct((b, k, g, h), jnp.float32), jax.ShapeDtypeStruct((b, k, g), jnp.float32),
              jax.ShapeDtypeStruct((b, k, g), jnp.float32)]
    o, m, l = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(
        jnp.asarray(layer, jnp.int32), q.reshape(b, k, g, h).astype(jnp.float32), k_codes, k_scale, k_zero, v_codes,
        v_scale, v_zero, valid.astype(jnp.bool_), key_bits=np.int32(key_bits), value_bits=np.int32(value_bits),
        group_size=np.int32(group_size), symmetric=np.int32(symmetric), sm_scale=np.float32(h ** -0.5))
    return da.Partials(o.reshape(b, k * g, h), m.reshape(b, k * g), l.reshape(b, k * g))


@functools.partial(jax.jit, static_argnames=("key_bits", "value_bits", "group_size", "symmetric"))
def packed_attention_partials_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, valid, *,
                                        key_bits: int, value_bits: int, group_size: int,
                                        symmetric: bool = False) -> da.Partials:
    """The kernel's jnp reference: decode_attention's attention over packed codes, same signature."""
    _check(q, k_codes, v_codes, valid, key_bits, value_bits, group_size, symmetric)
    return da.packed_partials(q, k_codes, k_scale, None if symmetric else k_zero, v_codes, v_scale,
                              None if symmetric else v_zero, valid, key_bits=key_bits, value_bits=value_bits,
                              group_size=group_size)
