"""What every evaluation command keeps per example: where (a folder per model, a key per policy)
and how (gzip archives of JSON lines, appended as each example is done, read back on a rerun)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib

import jax

from kvjax.policies import Policy, family_of


def model_tag(source: str) -> str:
    """A folder name for the model's cache: its file name plus a hash of the file's bytes (of the
    full path for a folder or hub id), so a cache follows the file and never mixes two models."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(source)))
    digest = hashlib.sha1()
    if os.path.isfile(source):
        with open(source, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    else:
        digest.update(os.path.abspath(source).encode())
    return f"{base}-{digest.hexdigest()[:8]}"


def cache_suffix(policy: Policy, overrides: str) -> str:
    """What besides the names tells score caches apart: the R/G overrides of quantized policies, a
    digest of the controller of learned and random ones and of the widths of learned allocations (a
    retrained controller or allocation starts afresh)."""
    if policy.name == "fp16":
        return ""
    controller = getattr(policy, "controller", None)
    suffix = overrides + (f"-c{controller.digest[:8]}" if controller is not None else "")
    if family_of(policy.name).takes_allocation:
        widths = json.dumps([policy.bands, policy.shares]).encode()
        suffix += f"-a{hashlib.sha256(widths).hexdigest()[:8]}"
    return suffix


def policy_key(policy: Policy, args) -> str:
    """The name a policy's records go under: its name, the tuning flags given (--window R, --group-size
    G, --sinks S) and `cache_suffix`'s digests: "kivi2-R16-G16"."""
    tuning = "".join(f"-{k}{v}" for k, v in (("R", args.window), ("G", args.group_size), ("S", args.sinks))
                     if v is not None)
    return policy.name + cache_suffix(policy, tuning)


def read_archive(path: str) -> tuple[list[dict], bool]:
    """The records of a task's score archive (gzip of JSON lines), and whether it ended cleanly (a run
    killed mid-write leaves a cut line or a cut gzip member; what came before is kept)."""
    records, clean = [], True
    if not os.path.exists(path):
        return records, clean
    try:
        with gzip.open(path, "rt") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    clean = False
    except (EOFError, OSError, zlib.error):
        clean = False
    return records, clean


def open_to_append(path: str):
    """The archive at `path` opened for appending records (folders made; a damaged end, from a run
    killed mid-write, rewritten first so that what is appended next can be read)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    records, clean = read_archive(path)
    if not clean:
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return gzip.open(path, "at")


def device_name() -> str:
    """The first device in words: "cpu (2 cores)" or e.g. "gpu NVIDIA H100 80GB HBM3"."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return f"{device.platform} {device.device_kind}"
