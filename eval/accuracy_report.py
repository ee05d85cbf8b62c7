"""Zero-shot accuracy as text and a picture: the Markdown table, the examples counted per task and
the accuracy-vs-bits plot, which `python -m eval` writes beside its results.json and `eval.report`
puts in its accuracy section (both import them from here).

`results` is results.json's: task -> policy -> {"acc", "acc_norm", "n"[, "changed", "changed_norm"]};
`bits` policy -> average bits, None for a policy that evicts (no bit count).
"""

from __future__ import annotations


def example_counts(results: dict, tasks: list[str]) -> str:
    """"arc_easy 570, hellaswag 1000": the examples scored per task (the same for every policy)."""
    return ", ".join(f"{t} {next(iter(results[t].values()))['n']}" for t in tasks)


def markdown_table(results: dict, tasks: list[str], policies: list[str], bits: dict) -> str:
    """Rows: policy (and its average bits); columns: acc and acc_norm of each task, and, when fp16
    was run, a second table of the answers that differ from fp16's."""
    head = ["policy", "bits"] + [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        cells = [p, "-" if bits[p] is None else f"{bits[p]:g}"]
        cells += [f"{results[t][p][m]:.3f}" for t in tasks for m in ("acc", "acc_norm")]
        lines.append("| " + " | ".join(cells) + " |")
    if all("changed" in results[t][p] for t in tasks for p in policies):
        lines += ["", "Answers that differ from fp16's (by acc's choice / by acc_norm's choice):", "",
                  "| policy | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for p in policies:
            cells = [p] + [f"{results[t][p]['changed']} / {results[t][p]['changed_norm']}" for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_plot(results: dict, tasks: list[str], policies: list[str], bits: dict, path: str):
    """Accuracy vs average bits, one panel per task: a colour per policy (acc filled, acc_norm
    hollow), fp16's two values as dashed lines; policies at the same bits are spread a little
    along x. Streaming (no bit count) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in policies if bits[p] is not None]
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows + 0.8), squeeze=False)
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(shown)}
    for ax, t in zip(axes.flat, tasks):
        for i, p in enumerate(shown):
            x = bits[p] * 2 ** (0.05 * (i - (len(shown) - 1) / 2))
            ax.scatter([x], [results[t][p]["acc"]], marker="o", color=colors[p], label=p)
            ax.scatter([x], [results[t][p]["acc_norm"]], marker="s", facecolors="none", edgecolors=colors[p])
        if "fp16" in results[t]:
            for metric in ("acc", "acc_norm"):
                ax.axhline(results[t]["fp16"][metric], color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlim(1.6, 20)
        ax.set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
        ax.set_title(f"{t} (n = {next(iter(results[t].values()))['n']})", fontsize=9)
        ax.set_xlabel("average bits per cached value", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(shown), 5), fontsize=8)
    fig.suptitle("Zero-shot accuracy vs KV-cache bits (filled: acc, hollow: acc_norm; dashed: fp16)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(shown) > 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
