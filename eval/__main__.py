"""Zero-shot accuracy of each KV-cache policy on multiple-choice tasks.

    python -m eval --tasks hellaswag,arc_easy --kv fp16,kivi2,mixed@3 --limit 50 --batch-size 8

Writes results.json, results.md (a table: one row per policy, acc / acc_norm per task) and
results.png (accuracy vs average bits) to --out. Scores are cached per (model, task, policy,
controller) as JSON lines under --cache-dir, one line per example, written after each batch: a
rerun skips what is cached, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from eval.scoring import accuracy, picks, score_requests
from eval.tasks import DATA_DIR, TASKS, check_task, load_task
from kvjax.errors import KvjaxError
from kvjax.loading import load_model
from kvjax.policies import Policy, add_policy_flags, policies_from_flags


def average_bits(policy: Policy) -> float | None:
    """Bits per cached value of the left tokens (fp16 16, kivi{b} b, mixed@B and band@B B); None for
    an evicting policy (no bit count)."""
    return policy.average_bits or None


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
    """What besides the names tells score caches apart: the R/G overrides of quantized policies and
    a digest of the controller of learned and random ones (a retrained controller starts afresh)."""
    if policy.name == "fp16":
        return ""
    controller = getattr(policy, "controller", None)
    return overrides + (f"-c{controller.digest[:8]}" if controller is not None else "")


def read_cache(path: str) -> dict[int, list[float]]:
    """index -> scores from a JSON-lines cache; a line cut short by an interruption is ignored."""
    cached = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    cached[int(record["index"])] = [float(x) for x in record["scores"]]
                except (ValueError, KeyError, TypeError):
                    continue
    return cached


def evaluate(model, requests, policy, cache_path: str, batch_size: int, desc: str = "") -> list[list[float]]:
    """Scores of all requests, reading and extending the cache at `cache_path`.

    Requests go in fixed chunks of `batch_size` examples (by index); a chunk with any example
    missing from the cache is scored again whole, so results do not depend on where a run stopped.
    """
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    cached = read_cache(cache_path)
    with tqdm(total=len(requests), desc=desc, leave=False) as bar:
        for start in range(0, len(requests), batch_size):
            chunk = range(start, min(start + batch_size, len(requests)))
            missing = [i for i in chunk if i not in cached]
            if missing:
                scores = score_requests(model, [requests[i] for i in chunk], policy, batch_size)
                with open(cache_path, "a") as f:
                    for i, s in zip(chunk, scores):
                        if i in missing:
                            cached[i] = s
                            f.write(json.dumps({"index": i, "scores": s}) + "\n")
            bar.update(len(chunk))
    return [cached[i] for i in range(len(requests))]


def count_changed(requests: list, scores: dict[str, list], results: dict):
    """Adds to each policy's results how many answers differ from fp16's: `changed` (acc's choice)
    and `changed_norm` (acc_norm's). Near chance, these show a policy's effect long before
    accuracy does."""
    base = picks(requests, scores["fp16"])
    for p, s in scores.items():
        mine = picks(requests, s)
        results[p]["changed"], results[p]["changed_norm"] = (int(np.sum(m != b)) for m, b in zip(mine, base))


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


def device_name() -> str:
    """The first device in words: "cpu (2 cores)" or e.g. "gpu NVIDIA H100 80GB HBM3"."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return f"{device.platform} {device.device_kind}"


def plot(results: dict, tasks: list[str], policies: list[str], bits: dict, path: str):
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="arc_easy,hellaswag", help=f"comma-separated: {', '.join(TASKS)}")
    add_policy_flags(p, default="fp16,kivi2")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--model", default=None, help=".gguf file, HF folder or hub id (default: embedded SmolLM2)")
    p.add_argument("--data-dir", default=DATA_DIR, help="the shared data folder (holds hf_datasets/)")
    p.add_argument("--out", default="results", help="folder for results.json, results.md, results.png")
    p.add_argument("--cache-dir", default="eval_cache", help="per-example score cache (for resuming)")
    return p.parse_args(argv)


def setup(args):
    """Validates everything before any scoring: (tasks, policies, specs, model, requests)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise KvjaxError("--tasks needs at least one name")
    if args.limit is not None and args.limit < 1:
        raise KvjaxError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise KvjaxError(f"--batch-size must be >= 1, got {args.batch_size}")
    for t in tasks:
        check_task(t)
    specs = {policy.name: policy for policy in policies_from_flags(args)}
    policies = list(specs)
    requests = {t: load_task(t, args.data_dir, args.limit) for t in tasks}
    try:
        model = load_model(args.model)
    except Exception as e:  # a damaged file can fail in many ways; keep it to one line
        if isinstance(e, KvjaxError):
            raise
        raise KvjaxError(f"cannot load model {args.model!r}: {type(e).__name__}: {e}") from None
    for policy in specs.values():
        policy.check(model.cfg)
    return tasks, policies, specs, model, requests


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tasks, policies, specs, model, requests = setup(args)
    except KvjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache_root = os.path.join(args.cache_dir, model_tag(model.source))
    suffix = "".join(f"-{k}{v}" for k, v in (("R", args.window), ("G", args.group_size)) if v is not None)
    results, seconds, scores = {t: {} for t in tasks}, {t: {} for t in tasks}, {t: {} for t in tasks}
    for t in tasks:
        for p in policies:
            t0 = time.perf_counter()
            path = os.path.join(cache_root, f"{t}__{p}{cache_suffix(specs[p], suffix)}.jsonl")
            scores[t][p] = evaluate(model, requests[t], specs[p], path, args.batch_size, desc=f"{t} {p}")
            results[t][p] = accuracy(requests[t], scores[t][p])
            seconds[t][p] = round(time.perf_counter() - t0, 2)
            print(f"{t:>14} {p:>12}  acc {results[t][p]['acc']:.3f}  acc_norm {results[t][p]['acc_norm']:.3f}  "
                  f"({results[t][p]['n']} examples, {seconds[t][p]:.0f} s)", flush=True)
        if "fp16" in policies:
            count_changed(requests[t], scores[t], results[t])
    bits = {p: average_bits(specs[p]) for p in policies}
    os.makedirs(args.out, exist_ok=True)
    report = {"command": "python -m eval " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name(), "date": datetime.date.today().isoformat(),
              "model": model.source, "tasks": tasks, "policies": policies, "limit": args.limit,
              "residual": args.window, "group_size": args.group_size, "average_bits": bits,
              "results": results, "seconds": seconds}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(results, tasks, policies, bits)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Model: `{os.path.basename(model.source)}`; examples per task: {example_counts(results, tasks)}"
                f"\n\n{table}")
    plot(results, tasks, policies, bits, os.path.join(args.out, "results.png"))
    print("\n" + table + f"\nwrote {args.out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
