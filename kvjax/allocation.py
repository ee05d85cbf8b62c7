"""Bit allocations: a width for keys and for values, per layer and per age band (the `Bands` policy
that stores one is made by kvjax.policies: `learned-alloc@B`).

An allocation is a small JSON file:

  {"keys":   [[4, 4, ...], [4, 2, ...], [2, 2, ...]],       # per band (newest first), one width per layer
   "values": [[...], [...], [...]],
   "shares": [0.125, 0.375],                                # age bands but the oldest: share of left tokens
   "sinks": 4, "window": 128, "group_size": 32,
   "rotate": "both",                                        # K/V rotated in training (kvjax.rotation; default none)
   "trained": {"budget_bits": 2.5, ...}}                    # how it was made (optional)

`train_controller.allocate` learns one; the package ships the ones trained for the default model
(kvjax/allocations/), which the `learned-alloc@B` policies use, and for `learned-alloc@B+rot` the ones
trained with rotated keys and values (`-rot` files).
"""

from __future__ import annotations

import dataclasses
import json
import os

from kvjax.errors import KvjaxError
from kvjax.layout import DEFAULT_GROUP, DEFAULT_SINKS, DEFAULT_WINDOW, WIDTHS
from kvjax.rotation import suffix_of
from kvjax.shipped import shipped_budgets, shipped_file

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allocations")


@dataclasses.dataclass(frozen=True)
class Allocation:
    keys: tuple[tuple[int, ...], ...]  # [band][layer], newest band first
    values: tuple[tuple[int, ...], ...]
    shares: tuple[float, ...]  # per band but the last
    sinks: int = DEFAULT_SINKS
    window: int = DEFAULT_WINDOW
    group_size: int = DEFAULT_GROUP
    rotate: str = "none"  # kvjax.rotation.ROTATIONS: the rotation it was trained for (a policy must use the same)
    trained: dict | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if len(self.keys) != len(self.values) or len(self.keys) != len(self.shares) + 1:
            raise KvjaxError(f"allocation: {len(self.keys)} key bands, {len(self.values)} value bands and "
                             f"{len(self.shares)} shares (need bands = shares + 1)")
        for side in (self.keys, self.values):
            for band in side:
                if len(band) != len(self.keys[0]) or any(w not in WIDTHS for w in band):
                    raise KvjaxError(f"allocation: every band needs one width in {WIDTHS} per layer, got {band}")

    @property
    def num_layers(self) -> int:
        return len(self.keys[0])

    @property
    def band_shares(self) -> tuple[float, ...]:
        return tuple(self.shares) + (1.0 - sum(self.shares),)

    @property
    def average_bits(self) -> float:
        """Average bits of a left token's K/V elements in a full cache (scales not counted)."""
        return sum(s * (sum(k) + sum(v)) / (2 * self.num_layers)
                   for s, k, v in zip(self.band_shares, self.keys, self.values))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (v if k == "trained" else _lists(v)) for k, v in d.items()}


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def load_allocation(path: str) -> Allocation:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise KvjaxError(f"cannot read allocation {path}: {e}") from None
    try:
        return Allocation(tuple(map(tuple, d["keys"])), tuple(map(tuple, d["values"])), tuple(d["shares"]),
                          d.get("sinks", DEFAULT_SINKS), d.get("window", DEFAULT_WINDOW),
                          d.get("group_size", DEFAULT_GROUP), d.get("rotate", "none"), d.get("trained"))
    except (KeyError, TypeError) as e:
        raise KvjaxError(f"allocation {path}: missing or malformed field ({e})") from None


def save_allocation(alloc: Allocation, path: str):
    """Writes the JSON file with one line per band, so that a diff shows which widths changed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    d = alloc.to_json()
    rows = lambda bands: "[\n  " + ",\n  ".join(json.dumps(b) for b in bands) + "\n ]"
    fields = [f' "{k}": {rows(d[k]) if k in ("keys", "values") else json.dumps(d[k])}' for k in d]
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(fields) + "\n}\n")


def _shipped_ending(rotate: str) -> str:
    """How the file shipped for this rotation ends: smollm2-135m-instruct-2.4bits-rot.json."""
    return suffix_of(rotate).replace("+", "-") + ".json"


def shipped_allocation_budgets(rotate: str = "none") -> str:
    """The budgets an allocation is shipped for under this rotation, ascending: "2.25, 2.5, 3"."""
    return shipped_budgets(DEFAULT_DIR, _shipped_ending(rotate))


def default_allocation(budget_bits: float, rotate: str = "none") -> Allocation:
    """The allocation shipped for the default model at this budget, trained for this rotation."""
    return load_allocation(shipped_file(DEFAULT_DIR, budget_bits, _shipped_ending(rotate), "allocation",
                                        "train one with python -m train_controller.allocate"
                                        f"{'' if rotate == 'none' else f' --rotate {rotate}'} and pass --allocation"))
