"""What every command line of kvjax shares.

Bad input ends with one `error: ...` line naming the flag and exit code 2, before anything slow
(loading a model, compiling) happens; progress goes to stderr; compiled programs are kept on disk
for the next run.

    def main(argv=None) -> int:
        return cli.run(lambda: _main(argv))
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import jax

from kvjax import sharding
from kvjax.errors import KvjaxError
from pallas_kernels.cache_folder import cache_dir


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with parse errors as one KvjaxError line instead of usage + message."""

    def error(self, message):
        raise KvjaxError(message)


def at_least(low, kind=int):
    """An argparse `type` for numbers >= low: `--steps 0` -> "argument --steps: must be >= 1, got 0"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def devices(text: str) -> int | None:
    """An argparse `type` for --devices: `all` -> None (every device), else a count >= 1."""
    return None if text == "all" else at_least(1)(text)


def above(low: float):
    """An argparse `type` for floats > low."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low:g}, got {text}")
        return value
    return parse


def int_list(low: int = 1):
    """An argparse `type` for comma-separated integers >= low: "128,1024"."""
    item = at_least(low)

    def parse(text):
        values = [item(x) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError("needs at least one value")
        return values
    return parse


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def output_file(text: str) -> str:
    """An argparse `type` for a file to write (its folders are made if missing): not a folder, and not
    under a file."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder")
    above = _existing_ancestor(os.path.dirname(os.path.abspath(text)))
    if not os.path.isdir(above):
        raise argparse.ArgumentTypeError(f"{above!r} is a file, not a folder")
    return text


def output_dir(text: str) -> str:
    """An argparse `type` for a folder to write into (made if missing): not a file, and not under one."""
    above = _existing_ancestor(text)
    if not os.path.isdir(above):
        raise argparse.ArgumentTypeError(f"{above!r} is a file, not a folder")
    return text


def readable_file(text: str) -> str:
    """An argparse `type` for a file to read: it exists and is a file this process may read."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file {text!r}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not readable")
    return text


def open_for_append(path: str):
    """Opens an output file for appending, making its folder first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a")


def say(message: str):
    """A progress line on stderr (the answer itself goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def use_compilation_cache():
    """Keeps XLA's compiled programs under $KVJAX_CACHE/xla (at most 1 GiB, the least recently used
    dropped first), so a command run again with the same shapes loads them instead of compiling; a
    cache the user named (JAX_COMPILATION_CACHE_DIR) is left as it is."""
    if jax.config.jax_compilation_cache_dir is not None:
        return
    folder = cache_dir() / "xla"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        say(f"[kvjax] compiled programs are not kept: cannot make {folder} ({e.strerror})")
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", 2**30)


def run(main: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Runs a command: a KvjaxError is one `error:` line and exit code 2, Ctrl-C exit code 130.
    Compiled programs are cached between runs (`use_compilation_cache`); a process of a multi-host
    run joins the others first (kvjax.sharding.initialize)."""
    use_compilation_cache()
    try:
        sharding.initialize()
        return main()
    except KvjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
