"""The retrieval suite's results as text and pictures: accuracy tables by length and by depth x
length, each policy against fp16 paired by example (table and plot), and depth x length heatmaps,
from the report `python -m eval.longctx` writes (longctx.json), which `eval.report --longctx` puts in
its retrieval section (both import them from here).

`report["records"]`: policy -> one record per example (task, haystack, length, depth, index, answer,
score in [0, 1]).
"""

from __future__ import annotations

import os

import numpy as np


def accuracy(records: list[dict], **where) -> tuple[float, int]:
    """(mean score in %, count) of the records matching `where` (field -> value)."""
    chosen = [r["score"] for r in records if all(r[k] == v for k, v in where.items())]
    return (100.0 * float(np.mean(chosen)) if chosen else float("nan")), len(chosen)


def cell(value: float, digits: int = 0) -> str:
    """A table cell: the value, or "-" where no example was answered."""
    return "-" if value != value else f"{value:.{digits}f}"


def label(length: int) -> str:
    """A context length as a column title: 8k, or 1000."""
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def compared_with_fp16(report: dict) -> bool:
    """Whether the report holds fp16 and another policy to set against it."""
    return "fp16" in report["policies"] and len(report["policies"]) > 1


def paired_differences(base: list[dict], other: list[dict], **where) -> np.ndarray:
    """other's score minus base's (points) for each example both answered that matches `where`, paired by
    (task, haystack, length, depth, index): the same prompt."""
    key = lambda r: (r["task"], r["haystack"], r["length"], r["depth"], r["index"])
    chosen = {key(r): r["score"] for r in base if all(r[k] == v for k, v in where.items())}
    return np.asarray([100.0 * (r["score"] - chosen[key(r)]) for r in other if key(r) in chosen], dtype=float)


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean); nan where there are too few values."""
    if len(values) < 2:
        return (float(values.mean()) if len(values) else float("nan")), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def signed(mean: float, error: float) -> str:
    """A paired difference as a cell: "-4.2 +- 3.1", or "-" where nothing was paired."""
    return "-" if mean != mean else f"{mean:+.1f}" + ("" if error != error else f" +- {error:.1f}")


def markdown(report: dict) -> str:
    """Accuracy (%) by length for each task and haystack (rows: policies), then by depth and length
    for each policy (all tasks together), then each policy against fp16 paired by example: by length, and
    its worst (length, depth) cell."""
    lengths, policies, records = report["lengths"], report["policies"], report["records"]
    combos = [(t, h) for t in report["tasks"] for h in (["noise"] if t == "vt" else report["haystacks"])]
    out = [f"Model `{os.path.basename(report['model'])}`; report made on {report['cpu']}, {report['date']} (examples "
           "scored before are read from the cache, on whichever machine scored them); "
           f"{report['depths']} depths x {report['samples']} examples per (task, haystack, length, depth); "
           f"greedy; score: the share of the needle's values in the answer (%).", "",
           "| task | haystack | policy | " + " | ".join(label(n) for n in lengths)
           + " | all |", "|" + "---|" * (len(lengths) + 4)]
    for t, h in combos:
        for p in policies:
            row = [accuracy(records[p], task=t, haystack=h, length=n)[0] for n in lengths]
            out.append(f"| {t} | {h} | {p} | " + " | ".join(cell(a) for a in row)
                       + f" | {cell(accuracy(records[p], task=t, haystack=h)[0], 1)} |")
    depths = sorted({r["depth"] for p in policies for r in records[p]})
    for p in policies:
        out += ["", f"**{p}**, all tasks: accuracy by depth (rows) and length (columns)", "",
                "| depth | " + " | ".join(str(n) for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
        for d in depths:
            out.append(f"| {d:g} | " + " | ".join(cell(accuracy(records[p], depth=d, length=n)[0])
                                                   for n in lengths) + " |")
    if compared_with_fp16(report):
        per_cell = report["samples"] * len(combos)
        out += ["", "Against fp16, paired by example (the same prompts): the mean difference in points (policy - fp16) "
                f"+- one standard error, all tasks; {per_cell * len(depths)} examples a length, {per_cell} a "
                "(length, depth) cell:", "",
                "| policy | " + " | ".join(label(n) for n in lengths) + " | worst (length, depth) cell |",
                "|" + "---|" * (len(lengths) + 2)]
        for p in [p for p in policies if p != "fp16"]:
            by_length = paired_by_length(report, p)
            cells = [(mean_and_error(paired_differences(records["fp16"], records[p], length=n, depth=d)), n, d)
                     for n in lengths for d in depths]
            cells = [c for c in cells if c[0][0] == c[0][0]]  # cells both answered
            worst = "-"
            if cells:
                difference, n, d = min(cells)
                worst = f"{signed(*difference)} at {label(n)}, depth {d:g}"
            out.append(f"| {p} | " + " | ".join(signed(*m) for m in by_length) + f" | {worst} |")
    return "\n".join(out) + "\n"


def paired_by_length(report: dict, policy: str) -> list[tuple[float, float]]:
    """(mean difference from fp16 in points, its standard error) at each of the report's lengths,
    paired by example."""
    records = report["records"]
    return [mean_and_error(paired_differences(records["fp16"], records[policy], length=n)) for n in report["lengths"]]


def differences_plot(report: dict, path: str):
    """Each policy's difference from fp16 by context (paired by example, +- one standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = report["lengths"]
    others = [p for p in report["policies"] if p != "fp16"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = plt.get_cmap("tab20").colors
    for k, p in enumerate(others):
        mean, error = np.asarray(paired_by_length(report, p)).T
        shift = (k - (len(others) - 1) / 2) * 0.012  # side by side, so the error bars stay apart
        ax.errorbar(np.log2(lengths) + shift, mean, yerr=error, marker="o" if k < 10 else "s", ms=4, capsize=2,
                    lw=1.2, color=colors[(2 * k if k < 10 else 2 * (k - 10) + 1) % 20], label=p)  # dark, then light
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.log2(lengths), [label(n) for n in lengths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("accuracy - fp16's (points, same prompts)")
    ax.set_title(f"Retrieval against fp16, paired by example, ± 1 SE ({os.path.basename(report['model'])})",
                 fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmaps(report: dict, path: str):
    """One panel per policy: accuracy (all tasks) by depth (rows) and length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, policies, records = report["lengths"], report["policies"], report["records"]
    depths = sorted({r["depth"] for p in policies for r in records[p]})
    columns = min(4, len(policies))
    rows = -(-len(policies) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.9 * columns + 0.6, 2.6 * rows + 0.6), squeeze=False)
    for k, (ax, p) in enumerate(zip(axes.flat, policies)):
        grid = np.asarray([[accuracy(records[p], depth=d, length=n)[0] for n in lengths] for d in depths])
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            ax.text(j, i, cell(a), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(p, fontsize=9)
        if k % columns == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        if k + columns >= len(policies):  # the lowest panel of its column
            ax.set_xlabel("context (tokens)", fontsize=8)
    for ax in list(axes.flat)[len(policies):]:
        ax.axis("off")
    fig.subplots_adjust(wspace=0.25, hspace=0.35)
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy (%)")
    fig.suptitle(f"Retrieval accuracy by needle depth and context ({os.path.basename(report['model'])})", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pictures(report: dict, path: str) -> list[str]:
    """Draws the heatmaps at `path` and, where the report holds fp16 and another policy, each policy
    against fp16 beside it (`-vs-fp16` before the extension); returns the files written."""
    heatmaps(report, path)
    written = [path]
    if compared_with_fp16(report):
        written.append(path.replace(".png", "-vs-fp16.png"))
        differences_plot(report, written[-1])
    return written
