"""Decode attention over one layer of a KV cache on a CPU: a C++ kernel called through XLA's FFI.

XLA:CPU has no Pallas backend, its fusions of the jnp reference (xla_attention's
`kivi_key_scores` and `kivi_value_mix`) unpack each code twice and run far below memory speed, and
each of the small XLA ops that attending over a sink, a window, a stage and a tier takes costs a
microsecond or more, 30 layers a step. cpu_attention.cc attends over every part of a layer in one
call: per packed slot it unpacks the codes (a shift and a table lookup per vector) and multiplies
them by q with the key scale folded in, and by the probabilities with the value scale folded in;
float parts (a sink, a window, a KIVI stage's keys, a whole fp16 cache) are read as they are. It
returns the flash-decoding partials of the union of the parts over the slots where each part's
`valid` is set (any pattern, so rings too), for KIVI and symmetric codes, keys and values at their
own widths in {2, 4, 8}. `python -m pallas_kernels.cpu_bench` measures it against the machine's
limits.

The library is compiled on first use with the machine's C++ compiler (g++ or $CXX) against the
FFI headers jaxlib ships, for the vector instructions /proc/cpuinfo lists, and cached under
$KVJAX_CACHE (default ~/.cache/kvjax) by a digest of the source, flags and jaxlib version.
`available()` says whether that worked; kvjax.kernels decides from it, once.

    attention_partials(q, parts, *, group_size) -> Partials   (parts: xla_attention.Part, as every backend)
    reference: attention_partials_reference = xla_attention.attention_partials, same signature.
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

from pallas_kernels import xla_attention as xla
from pallas_kernels.cache_folder import cache_dir
from pallas_kernels.xla_attention import FLOATS, Part, packed_part  # noqa: F401  (the parts this kernel reads)

SOURCE = Path(__file__).with_name("cpu_attention.cc")
CHUNK_SOURCE = Path(__file__).with_name("cpu_chunk_attention.cc")  # a prompt chunk's queries (cpu_chunk_attention.py)
MATMUL_SOURCE = Path(__file__).with_name("cpu_matmul.cc")  # block-quantized weights (block_matmul.py)
SOURCES = (SOURCE, CHUNK_SOURCE, MATMUL_SOURCE)  # one library; all include cpu_kernels.h
TARGET = "kvjax_layer_attention"
CHUNK_TARGET = "kvjax_chunk_attention"
MATMUL_TARGET = "kvjax_block_matmul"
_HANDLERS = {TARGET: "KvjaxLayerAttention", CHUNK_TARGET: "KvjaxChunkAttention",
             MATMUL_TARGET: "KvjaxBlockMatmul"}  # target -> exported symbol


def vector_flags(vector: bool = True) -> list[str]:
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


def _sources(source) -> list[Path]:
    return [source] if isinstance(source, Path) else list(source)


def _compile_command(out: Path, vector: bool = True, source=SOURCES) -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    # Reassociation lets the dot products and sums vectorize; no finite-math assumptions (masks use EMPTY_MAX).
    return [cxx, "-std=c++17", "-O3", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math",
            "-fno-signed-zeros", "-fno-trapping-math", *vector_flags(vector), f"-I{jax.ffi.include_dir()}",
            *map(str, _sources(source)), "-o", str(out)]


def build_library(source=SOURCES, vector: bool = True) -> Path:
    """The shared library of C++ sources (a Path or several: the kernels, or cpu_bench's
    cpu_limits.cc) compiled with the kernel's command, built if these sources, the headers beside
    them, these flags and this jaxlib have none yet (in cache_dir(), which the caller makes)."""
    sources = _sources(source)
    command = _compile_command(Path("OUT"), vector, sources)
    headers = sorted(sources[0].parent.glob("*.h"))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources + headers) + " ".join(command).encode()
                         + jaxlib.__version__.encode()).hexdigest()
    cache = cache_dir()
    path = cache / f"{sources[0].stem}-{key[:16]}.so"
    if not path.exists():
        what = "the CPU kernels" if sources == list(SOURCES) else ", ".join(p.name for p in sources)
        print(f"[kvjax] compiling {what} (once, about 30 s)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: no half-written library
            built = Path(tmp) / path.name
            subprocess.run(_compile_command(built, vector, sources), check=True, capture_output=True, text=True)
            os.replace(built, path)
    return path


def target(name: str = TARGET, portable: bool = False) -> str:
    """The FFI target of a kernel (TARGET, CHUNK_TARGET) in the vector or the portable build."""
    return name + "_portable" if portable else name


@functools.cache
def _registered(suffix: str = "", vector: bool = True) -> str | None:
    """Builds the kernels once and registers each under its target + `suffix`: None when ready, else
    why not (one line)."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot make the kernel's folder {cache_dir()} ({e.strerror})"
    try:
        library = ctypes.CDLL(str(build_library(SOURCES, vector)))
    except FileNotFoundError as e:
        return f"no C++ compiler ({e.filename})"
    except subprocess.CalledProcessError as e:
        return "compiling the CPU kernels failed: " + (e.stderr.strip().splitlines() or ["?"])[-1]
    except OSError as e:
        return f"loading the compiled kernel failed: {e}"
    for name, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(name + suffix, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def available() -> bool:
    """Whether the CPU kernels are built and registered (builds them on first call)."""
    return _registered() is None


def unavailable_reason(suffix: str = "", vector: bool = True) -> str | None:
    """Why the kernels cannot run (one line), None when they can: they are built (`vector`: for this
    CPU's vector instructions, else the portable build) and registered under their targets +
    `suffix` on the first call."""
    return _registered(suffix, vector)


def require(portable: bool = False):
    """Builds and registers the kernels of one build, or raises a RuntimeError saying why not."""
    reason = _registered(target("", portable), not portable)
    if reason is not None:
        raise RuntimeError(f"the CPU kernels are unavailable: {reason}")


def supported(head_dim: int, group_size: int, symmetric: bool) -> bool:
    """Whether the kernel takes tiers of this head dim and group size (the rest use the reference)."""
    return head_dim % 16 == 0 and head_dim <= 256 and (symmetric or (head_dim % group_size == 0 and
                                                                     head_dim // group_size <= 8))


def _check(q, parts, group_size):
    b, k, g, h = xla.check_parts(q, parts, group_size)
    for part in parts:
        if not supported(h, group_size, part.symmetric or not part.packed):
            raise ValueError(f"the CPU kernel takes head dims that are multiples of 16 up to 256, and at least "
                             f"{h // 8} channels per value group; not {h} and {group_size}")
    return b, k, g, h


@functools.partial(jax.jit, static_argnames=("group_size", "portable"))
def attention_partials(q, parts, *, group_size: int, portable: bool = False) -> xla.Partials:
    """Partials of q [b, n, h] over the union of the parts' valid slots (the C++ kernel): one call.
    `portable`: the build without vector extensions (for tests)."""
    parts = tuple(parts)
    b, k, g, h = _check(q, parts, group_size)
    require(portable)
    operands = []
    for p in parts:  # 8 per part; what a part does not read is passed as its keys (never read)
        dummy = lambda x: p.keys if x is None else x
        offset = jnp.zeros((b,), jnp.int32) if p.value_offset is None else p.value_offset.astype(jnp.int32)
        operands += [p.keys, dummy(p.key_scale), dummy(p.key_zero), p.values, dummy(p.value_scale),
                     dummy(p.value_zero), p.valid.astype(jnp.bool_), offset]
    layers = jnp.stack([jnp.asarray(p.layer, jnp.int32) for p in parts])
    shapes = [jax.ShapeDtypeStruct((b, k, g, h), jnp.float32), jax.ShapeDtypeStruct((b, k, g), jnp.float32),
              jax.ShapeDtypeStruct((b, k, g), jnp.float32)]
    o, m, l = jax.ffi.ffi_call(target(TARGET, portable), shapes, vmap_method="sequential")(
        layers, q.reshape(b, k, g, h).astype(jnp.float32), *operands,
        key_bits=np.array([p.key_bits for p in parts], np.int32),
        value_bits=np.array([p.value_bits for p in parts], np.int32),
        symmetric=np.array([p.symmetric for p in parts], np.int32), group_size=np.int32(group_size),
        sm_scale=np.float32(h ** -0.5))
    return xla.Partials(o.reshape(b, k * g, h), m.reshape(b, k * g), l.reshape(b, k * g))


# The kernel's reference: the same partials in XLA (every part's arrays read at its layer).
attention_partials_reference = xla.attention_partials
