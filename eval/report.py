"""`python -m eval.report`: one Markdown report (with plots) from the measurement commands' outputs.

    python -m eval --tasks hellaswag,arc_easy,arc_challenge,openbookqa,winogrande --kv ... --out results
    python -m eval.perplexity --kv ... --text wikitext2 --json ppl.jsonl
    python -m kvjax.bench --preset SmolLM-360M --kv ... --json bench.jsonl        (on the GPU)
    python -m eval.longctx --kv ... --out results/longctx
    python -m eval.report --accuracy results/results.json --perplexity ppl.jsonl [more.jsonl ...] \\
        --latency bench.jsonl [more.jsonl ...] --longctx results/longctx/longctx.json --out docs/RESULTS.md

Each input is optional; the report has a section per input given: zero-shot accuracy (table and
accuracy-vs-bits plot), perplexity (policy x text table; widths table and stacked-bar plot for
records that carry a histogram of widths; a picture of each shipped allocation scored), decode
latency (table and ms/token vs context plot, one line per policy), retrieval at long context
(accuracy by length, by depth x length, heatmaps). Plots are written beside the report as PNG files.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import numpy as np

from eval.accuracy_report import accuracy_plot, example_counts, markdown_table
from eval.longctx_report import markdown, pictures
from kvjax import cli
from kvjax.allocation import Allocation, default_allocation
from kvjax.errors import KvjaxError
from kvjax.policies import split_rotation
from kvjax.rotation import SUFFIXES


def read_json_lines(path: str) -> list[dict]:
    """Records of a JSON-lines file; a missing file or a bad line is a KvjaxError."""
    if not os.path.exists(path):
        raise KvjaxError(f"no such file: {path}")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise KvjaxError(f"{path}:{number} is not a JSON line") from None
    return records


def read_report(path: str, keys: tuple[str, ...], name: str, writer: str) -> dict:
    """A command's JSON report (`name`, written by `writer`), with `keys`; a missing file or another
    file is a KvjaxError."""
    if not os.path.exists(path):
        raise KvjaxError(f"no such file: {path}")
    try:
        with open(path) as f:
            report = json.load(f)
        for key in keys:
            report[key]
    except (ValueError, KeyError, TypeError):
        raise KvjaxError(f"{path} is not a {name} written by `{writer}`") from None
    return report


def accuracy_section(report: dict, plot_path: str) -> str:
    tasks, policies, results = report["tasks"], report["policies"], report["results"]
    bits = report.get("average_bits", {p: None for p in policies})
    accuracy_plot(results, tasks, policies, bits, plot_path)
    sizes = example_counts(results, tasks)
    lines = ["## Zero-shot accuracy", "", f"Model `{os.path.basename(report.get('model', '?'))}`; examples per "
             f"task: {sizes}; device {report.get('device', '?')}; date {report.get('date', '?')}.", ""]
    if report.get("command"):
        lines += [f"`{report['command']}`", ""]
    lines += [markdown_table(results, tasks, policies, bits), f"![accuracy vs bits]({os.path.basename(plot_path)})", ""]
    return "\n".join(lines)


def perplexity_row(record: dict) -> str:
    """A perplexity record's row label: its policy, and the controller or allocation file when one was given."""
    given = record.get("controller") or record.get("allocation")
    return record["policy"] + (f" ({given})" if given else "")


def perplexity_section(records: list[dict], source: str, widths_plot_path: str) -> str:
    texts = sorted({(r["text"], r["context"]) for r in records})
    policies = list(dict.fromkeys(perplexity_row(r) for r in records))
    cell = {(perplexity_row(r), r["text"], r["context"]): r for r in records}  # the last record of a cell wins
    head = ["policy"] + [f"{t} @{c}" for t, c in texts] + ["KV bytes/token"]
    lines = ["## Perplexity", "", f"From `{source}` (`python -m eval.perplexity`): exp(mean next-token NLL) "
             "over the scored tokens, through each policy's exact teacher-forced path."
             + (" WikiText-2 is the word-level *tokenized* test file (wiki.test.tokens, with `<unk>`), not the"
                " raw one." if any(t == "wikitext2" for t, _ in texts) else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        row = [p] + [f"{cell[(p, t, c)]['perplexity']:.2f}" if (p, t, c) in cell else "-" for t, c in texts]
        kv = [cell[k]["kv_bytes_per_token"] for k in cell if k[0] == p and "kv_bytes_per_token" in cell[k]]
        row.append(f"{kv[-1]:.0f}" if kv else "-")
        lines.append("| " + " | ".join(row) + " |")
    keyed = width_records(cell)
    widths = widths_table(keyed)
    if widths:
        widths_plot(keyed, widths_plot_path)
        widths += ["", f"![widths of the left tokens]({os.path.basename(widths_plot_path)})"]
    return "\n".join(lines + widths + allocation_lines(records, widths_plot_path)) + "\n"


def allocation_lines(records: list[dict], widths_plot_path: str) -> list[str]:
    """A picture of each shipped allocation scored (learned-alloc@B without an allocation file of its
    own), beside the widths plot."""
    shipped = list(dict.fromkeys(split_rotation(r["policy"]) for r in records
                                 if r["policy"].startswith("learned-alloc@") and not r.get("allocation")))
    if not shipped:
        return []
    lines = ["", "### The learned allocations", "",
             "Widths per layer and age band (newest left tokens first) for keys and values, as shipped in "
             "`kvjax/allocations/` and trained by `python -m train_controller.allocate`:", ""]
    stem = os.path.splitext(widths_plot_path)[0].removesuffix("-widths")
    for name, suffix in shipped:
        b = float(name.partition("@")[2])
        path = f"{stem}-allocation-{b:g}{suffix.replace('+', '-')}.png"
        alloc = default_allocation(b, SUFFIXES.get(suffix, "none"))
        title = f"learned-alloc@{b:g}{suffix}: {alloc.average_bits:.3f} average bits, G = {alloc.group_size}"
        allocation_plot(alloc, path, title + (f", {alloc.rotate} rotated" if suffix else ""))
        lines.append(f"![learned-alloc@{b:g}{suffix}]({os.path.basename(path)})")
    return lines


def allocation_plot(alloc: Allocation, path: str, title: str):
    """Two panels (keys, values): the width of every (age band, layer), labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, bands = alloc.num_layers, len(alloc.keys)
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * bands), sharey=True)
    for ax, side, widths in ((axes[0], "keys", alloc.keys), (axes[1], "values", alloc.values)):
        ax.imshow(np.log2(np.asarray(widths, np.float64)), cmap="viridis", vmin=1, vmax=4, aspect="auto")
        for b in range(bands):
            for l in range(L):
                ax.text(l, b, str(widths[b][l]), ha="center", va="center", fontsize=6,
                        color="white" if widths[b][l] <= 4 else "black")
        ax.set_title(side, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(range(0, L, 5))
    edges = np.concatenate([[0.0], np.cumsum(alloc.band_shares)])
    labels = [f"{a:.0%}-{b:.0%}" for a, b in zip(edges[:-1], edges[1:])]
    axes[0].set_yticks(range(bands), labels, fontsize=7)
    axes[0].set_ylabel("left tokens,\nnewest first", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# histogram keys, widest first ("0" = evicted), and their colours in the widths plot
WIDTH_COLOURS = {"16": "tab:blue", "8": "tab:green", "4": "tab:orange", "2": "tab:red", "0": "lightgrey"}


def width_records(cell: dict) -> list[tuple[tuple, dict]]:
    """The (policy, text, context) cells that carry a histogram of whole widths (not of widths averaged
    over layers, as a policy whose widths differ by layer or between keys and values gives), by text,
    then in the perplexity table's policy order."""
    order = {policy: i for i, policy in enumerate(dict.fromkeys(key[0] for key in cell))}
    keyed = [(key, r) for key, r in cell.items() if set(r.get("histogram", {"?": 1})) <= set(WIDTH_COLOURS)]
    return sorted(keyed, key=lambda kr: (kr[0][1], kr[0][2], order[kr[0][0]]))


def widths_plot(keyed: list[tuple[tuple, dict]], path: str):
    """Stacked bars of the widths each policy gave its left tokens (`width_records`), one panel per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys((text, context) for (_, text, context), _ in keyed))
    most_rows = max(sum((t, c) == text for (_, t, c), _ in keyed) for text in texts)
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 0.35 * most_rows + 2), squeeze=False)
    for ax, (text, context) in zip(axes[0], texts):
        rows = [(policy, r) for (policy, t, c), r in keyed if (t, c) == (text, context)]
        left = [0.0] * len(rows)
        for code, colour in WIDTH_COLOURS.items():
            shares = [r["histogram"].get(code, 0.0) for _, r in rows]
            ax.barh(range(len(rows)), shares, left=left, color=colour,
                    label="evicted" if code == "0" else f"{code} bits")
            left = [a + b for a, b in zip(left, shares)]
        ax.set_yticks(range(len(rows)), [f"{p} ({r['average_bits']:.2f})" for p, r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the tokens that left the window")
        ax.set_title(f"{text} @{context} (average bits in brackets)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(WIDTH_COLOURS), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def widths_table(keyed: list[tuple[tuple, dict]]) -> list[str]:
    """Lines of a table of the widths each policy gave the tokens that left the window, per text
    (`width_records`; none: no lines)."""
    if not keyed:
        return []
    codes = list(WIDTH_COLOURS)
    lines = ["", "Widths of the tokens that had left the 16-bit window by the last query of their segment "
             "(average bits, and the share at each width; 0 = evicted):", "",
             "| policy | text | average bits | " + " | ".join(f"{c} bits" for c in codes) + " |",
             "|" + "---|" * (3 + len(codes))]
    for (policy, text, context), r in keyed:
        shares = [f"{r['histogram'].get(c, 0.0):.3f}" for c in codes]
        lines.append(f"| {policy} | {text} @{context} | {r['average_bits']:.2f} | " + " | ".join(shares) + " |")
    return lines


def latency_plot(records: list[dict], path: str):
    """ms/token vs context, one line per policy, one panel per (model, device, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["device"], r["batch"]) for r in records))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (model, device, batch) in zip(axes[0], panels):
        rows = [r for r in records if (r["model"], r["device"], r["batch"]) == (model, device, batch)]
        for kv in dict.fromkeys(r["kv"] for r in rows):
            pts = sorted((r["context"], r["decode_ms_per_token"]) for r in rows if r["kv"] == kv)
            ax.plot([c for c, _ in pts], [ms for _, ms in pts], "o-", label=kv)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode ms/token")
        ax.set_title(f"{model}, batch {batch}\n{device}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_section(records: list[dict], source: str, plot_path: str) -> str:
    latency_plot(records, plot_path)
    lines = ["## Decode latency and memory", "",
             f"From `{source}` (`python -m kvjax.bench`): greedy decode steps in one jitted loop, median "
             "after a warm-up.", ""]
    for model, device, batch in dict.fromkeys((r["model"], r["device"], r["batch"]) for r in records):
        rows = [r for r in records if (r["model"], r["device"], r["batch"]) == (model, device, batch)]
        first = rows[0]
        lines += [f"**{model}**, batch {batch}, {device}, {first.get('dtype', '?')}, jax {first.get('jax', '?')}, "
                  f"{first.get('date', '?')}: `{first.get('command', '?')}`", ""]
        for note in dict.fromkeys(r["note"] for r in rows if r.get("note")):  # e.g. where the numbers came from
            lines += [f"Note: {note}", ""]
        lines += ["| policy | context | decode ms/token | tokens/s | KV MiB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['kv']} | {r['context']} | {r['decode_ms_per_token']:.2f} | {r['decode_tokens_per_s']:.1f} "
                  f"| {r['kv_bytes'] / 2**20:.1f} |" for r in rows]
        lines.append("")
    lines.append(f"![decode ms/token vs context]({os.path.basename(plot_path)})")
    return "\n".join(lines) + "\n"


def longctx_section(report: dict, source: str, plot_path: str) -> str:
    heat, *vs_fp16 = pictures(report, plot_path)
    return (f"## Retrieval at long context\n\n`{report['command']}` ({source})\n\n{markdown(report)}\n"
            f"![retrieval heatmaps]({os.path.basename(heat)})\n"
            + "".join(f"\n![retrieval against fp16]({os.path.basename(f)})\n" for f in vs_fp16))


def build(accuracy: str | None, perplexity: list[str] | None, latency: list[str] | None, out: str,
          command: str, longctx: str | None = None) -> str:
    """Writes the report (and its plots beside it); returns its text."""
    if not (accuracy or perplexity or latency or longctx):
        raise KvjaxError("give at least one of --accuracy, --perplexity, --latency, --longctx")
    lines_of = lambda paths: [r for path in paths for r in read_json_lines(path)]
    inputs = (read_report(accuracy, ("results", "tasks", "policies"), "results.json", "python -m eval") if accuracy else None,
              lines_of(perplexity) if perplexity else None,
              lines_of(latency) if latency else None)
    retrieval = (read_report(longctx, ("records", "policies", "lengths"), "longctx.json",
                             "python -m eval.longctx")
                 if longctx else None)
    folder, stem = os.path.dirname(out) or ".", os.path.splitext(os.path.basename(out))[0]
    os.makedirs(folder, exist_ok=True)
    parts = [f"# Results\n\nMade by `{command}` on {datetime.date.today().isoformat()}.\n"]
    if inputs[0] is not None:
        parts.append(accuracy_section(inputs[0], os.path.join(folder, f"{stem}-accuracy.png")))
    if inputs[1]:
        parts.append(perplexity_section(inputs[1], ", ".join(perplexity), os.path.join(folder, f"{stem}-widths.png")))
    if inputs[2]:
        parts.append(latency_section(inputs[2], ", ".join(latency), os.path.join(folder, f"{stem}-latency.png")))
    if retrieval is not None:
        parts.append(longctx_section(retrieval, longctx, os.path.join(folder, f"{stem}-retrieval.png")))
    text = "\n".join(parts)
    with open(out, "w") as f:
        f.write(text)
    return text


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    p.add_argument("--accuracy", default=None, help="results.json from `python -m eval`")
    p.add_argument("--perplexity", nargs="+", default=None, help="JSON lines from `python -m eval.perplexity --json`")
    p.add_argument("--latency", nargs="+", default=None, help="JSON lines from `python -m kvjax.bench --json`")
    p.add_argument("--longctx", default=None, help="longctx.json from `python -m eval.longctx`")
    p.add_argument("--out", type=cli.output_file, default="docs/RESULTS.md",
                   help="the Markdown report; its plots are written beside it")
    return p


def main(argv=None) -> int:
    def run():
        args = _parser().parse_args(argv)
        command = "python -m eval.report " + " ".join(sys.argv[1:] if argv is None else argv)
        build(args.accuracy, args.perplexity, args.latency, args.out, command, args.longctx)
        print(f"wrote {args.out}")
        return 0

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
