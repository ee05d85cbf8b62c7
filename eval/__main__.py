"""Zero-shot accuracy of each KV-cache policy on multiple-choice tasks.

    python -m eval --tasks hellaswag,arc_easy --kv fp16,kivi2,mixed@3 --limit 50 --batch-size 8

Writes results.json, results.md (a table: one row per policy, acc / acc_norm per task) and
results.png (accuracy vs average bits) to --out. Every example's scores are kept in one gzip archive
per (model, task) under --cache-dir, one JSON line per (policy, example), appended as soon as it
is scored: a rerun skips what is there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from eval.archive import device_name, model_tag, open_to_append, policy_key, read_archive
from eval.accuracy_report import accuracy_plot, example_counts, markdown_table
from eval.scoring import accuracy, picks, score_requests
from eval.tasks import TASKS, check_task, load_task
from kvjax import cli
from kvjax.data import DATA_DIR
from kvjax.errors import KvjaxError
from kvjax.flags import (add_devices_flag, add_policy_flags, add_weights_flag, mesh_from_flags, policies_from_flags,
                         weights_from_flags)
from kvjax.loading import load_model, read_config, resolve_model
from kvjax.policies import Policy


def average_bits(policy: Policy, cfg) -> float | None:
    """Bits per cached value of the left tokens in a cache full at the model's context (fp16 16, kivi{b}
    b, mixed@B B, band@B and learned-alloc@B within a group's rounding of B: `Policy.average_bits`);
    None for a policy that evicts (no bit count)."""
    return None if policy.evicts else policy.average_bits(cfg)


def read_cache(path: str, key: str) -> dict[int, list[float]]:
    """index -> scores of policy `key` in a task's score archive."""
    cached = {}
    for record in read_archive(path)[0]:
        try:
            if record["policy"] == key:
                cached[int(record["index"])] = [float(x) for x in record["scores"]]
        except (KeyError, TypeError, ValueError):
            continue
    return cached


def evaluate(model, requests, policy, cache_path: str, key: str, batch_size: int, desc: str = "",
             mesh=None) -> list[list[float]]:
    """Scores of all requests under `policy`, reading and extending the task's score archive.

    The requests not in it are scored together (bucketed by length across all of them, see
    eval.scoring.score_requests), each appended to the archive as soon as its last continuation is
    scored: an interrupted run resumes where it stopped, and a row's scores do not depend on the
    rows it was batched with (on a `mesh`, a batch is split over its devices: kvjax.sharding).
    """
    cached = read_cache(cache_path, key)
    missing = [i for i in range(len(requests)) if i not in cached]
    with tqdm(total=len(requests), initial=len(requests) - len(missing), desc=desc, leave=False) as bar, \
            open_to_append(cache_path) as archive:
        def done(j, scores):
            cached[missing[j]] = scores
            archive.write(json.dumps({"policy": key, "index": missing[j], "scores": scores}) + "\n")
            archive.flush()
            bar.update(1)

        if missing:
            score_requests(model, [requests[i] for i in missing], policy, batch_size, on_done=done, mesh=mesh)
    return [cached[i] for i in range(len(requests))]


def count_changed(requests: list, scores: dict[str, list], results: dict):
    """Adds to each policy's results how many answers differ from fp16's: `changed` (acc's choice)
    and `changed_norm` (acc_norm's). Near chance, these show a policy's effect long before
    accuracy does."""
    base = picks(requests, scores["fp16"])
    for p, s in scores.items():
        mine = picks(requests, s)
        results[p]["changed"], results[p]["changed_norm"] = (int(np.sum(m != b)) for m, b in zip(mine, base))


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="arc_easy,hellaswag", help=f"comma-separated: {', '.join(TASKS)}")
    add_policy_flags(p, default="fp16,kivi2")
    p.add_argument("--limit", type=cli.at_least(1), default=None, help="first N examples of each task (default: all)")
    p.add_argument("--batch-size", type=cli.at_least(1), default=8, help="sequences per forward pass on each device")
    p.add_argument("--model", default=None, help=".gguf file, HF folder or hub id (default: embedded SmolLM2)")
    add_weights_flag(p)
    add_devices_flag(p)
    p.add_argument("--data-dir", default=DATA_DIR,
                   help="the shared data folder, with hf_datasets/ (default: $KVJAX_DATA, else ../shared/data)")
    p.add_argument("--out", type=cli.output_dir, default="results", help="folder for results.json, results.md, results.png")
    p.add_argument("--cache-dir", type=cli.output_dir, default="eval_cache",
                   help="where every example's scores are kept, one archive per task (an interrupted run resumes)")
    return p


def setup(args):
    """Validates everything before any scoring: (tasks, policies, specs, model, requests, mesh)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise KvjaxError("--tasks needs at least one name")
    for t in tasks:
        check_task(t)
    specs = {policy.name: policy for policy in policies_from_flags(args)}
    policies = list(specs)
    cfg = read_config(args.model)
    for policy in specs.values():
        if cfg is not None:
            policy.check(cfg)
    mesh = mesh_from_flags(args)
    requests = {t: load_task(t, args.data_dir, args.limit) for t in tasks}  # files after the flags
    cli.say(f"[kvjax] loading {resolve_model(args.model)}")
    model = load_model(args.model, weights=weights_from_flags(args))
    for policy in specs.values():
        policy.check(model.cfg)
    return tasks, policies, specs, model, requests, mesh


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    tasks, policies, specs, model, requests, mesh = setup(args)
    cache_root = os.path.join(args.cache_dir, model_tag(model.source))
    results, seconds, scores = {t: {} for t in tasks}, {t: {} for t in tasks}, {t: {} for t in tasks}
    for t in tasks:
        for p in policies:
            t0 = time.perf_counter()
            path = os.path.join(cache_root, f"{t}.jsonl.gz")
            key = policy_key(specs[p], args)
            scores[t][p] = evaluate(model, requests[t], specs[p], path, key, args.batch_size, desc=f"{t} {p}",
                                     mesh=mesh)
            results[t][p] = accuracy(requests[t], scores[t][p])
            seconds[t][p] = round(time.perf_counter() - t0, 2)
            print(f"{t:>14} {p:>12}  acc {results[t][p]['acc']:.3f}  acc_norm {results[t][p]['acc_norm']:.3f}  "
                  f"({results[t][p]['n']} examples, {seconds[t][p]:.0f} s)", flush=True)
        if "fp16" in policies:
            count_changed(requests[t], scores[t], results[t])
    bits = {p: average_bits(specs[p], model.cfg) for p in policies}
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
    accuracy_plot(results, tasks, policies, bits, os.path.join(args.out, "results.png"))
    print("\n" + table + f"\nwrote {args.out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
