"""Files shipped inside the package for the default model, one per bit budget (controllers, allocations)."""

from __future__ import annotations

import os

from kvjax.errors import KvjaxError

DEFAULT_MODEL_STEM = "smollm2-135m-instruct"


def shipped_file(folder: str, budget_bits: float, ext: str, kind: str, train_hint: str) -> str:
    """The path of the file shipped for this budget; a KvjaxError listing what is shipped if none."""
    path = os.path.join(folder, f"{DEFAULT_MODEL_STEM}-{budget_bits:g}bits{ext}")
    if not os.path.isfile(path):
        shipped = sorted(f for f in os.listdir(folder) if f.endswith(ext)) if os.path.isdir(folder) else []
        raise KvjaxError(f"no shipped {kind} for {budget_bits:g} bits (shipped: {', '.join(shipped) or 'none'}); "
                         f"{train_hint}")
    return path


def shipped_budgets(folder: str, ext: str) -> str:
    """The budgets shipped in `folder` with exactly this ending, ascending: "2.25, 2.5, 3" (for help texts)."""
    prefix = f"{DEFAULT_MODEL_STEM}-"
    names = os.listdir(folder) if os.path.isdir(folder) else []
    budgets = [name[len(prefix):].partition("bits") for name in names if name.startswith(prefix)]
    return ", ".join(sorted((b for b, sep, rest in budgets if sep and rest == ext), key=float))
