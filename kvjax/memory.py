"""How much memory this process holds at its peak, and how much a request will need.

On a CPU the process's peak resident set (Linux: VmHWM in /proc/self/status, which writing "5" to
/proc/self/clear_refs resets, so that one process can measure several runs); on GPU/TPU the
device's `memory_stats()` peak bytes in use. `estimate` bounds the peak of a generate, bench or
eval request before anything is loaded or compiled, so that the commands can refuse one that
would not fit (`--max-memory`) with an `error:` line instead of being killed by the kernel.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re

import jax

GIB = 2 ** 30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def on_device() -> bool:
    """Whether arrays live in a device's own memory (GPU/TPU) rather than the process's."""
    return jax.default_backend() != "cpu"


def current() -> int:
    """Bytes held now: the resident set on a CPU, the device's bytes in use elsewhere."""
    if on_device():
        return int(jax.devices()[0].memory_stats().get("bytes_in_use", 0))
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def peak() -> int:
    """The peak since the process started or the last `reset_peak`: resident set (CPU) or device bytes."""
    if on_device():
        return int(jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0))
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the lifetime peak
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def release_freed():
    """Hands memory the process has freed back to the system (glibc's malloc_trim), so that what it
    holds (`current`) is what it uses: XLA's CPU buffers come from malloc, which keeps freed pages."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak() -> bool:
    """Starts a new peak from what the process holds now (Linux; a device's peak cannot be reset),
    after handing freed memory back (`release_freed`)."""
    if on_device():
        return False
    release_freed()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available() -> int:
    """Bytes this process may still use: MemAvailable (Linux), or the device's limit minus its use."""
    if on_device():
        stats = jax.devices()[0].memory_stats()
        return int(stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What a request needs at its peak, in bytes."""

    weights: int
    cache: int
    transient: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.transient

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, KV cache {self.cache / GIB:.2f}, "
                f"working memory {self.transient / GIB:.2f})")


def parameter_bytes(cfg, dtype) -> int:
    """Bytes of the params pytree of `cfg` in `dtype` (kvjax.model.init_params' tree)."""
    d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * f
    count = cfg.vocab_size * d + l * per_layer + d + (0 if cfg.tie_word_embeddings else cfg.vocab_size * d)
    return count * jax.numpy.dtype(dtype).itemsize
