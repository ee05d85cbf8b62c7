"""Do `python -m eval` and the lm-evaluation-harness path score the same examples the same way?

    python experiments/harness_equality.py --limit 200 --kv fp16,kivi2 --window 16 --group-size 16 \
        --out docs/results/harness-equality.json

For the first --limit examples of hellaswag, arc_easy, arc_challenge, openbookqa and winogrande: the
(context, continuation) pairs and gold labels of the harness's task configs against eval.tasks',
then, per policy, every choice's log-likelihood by both paths (eval.scoring.score_requests, as
`python -m eval` scores; lm_eval.simple_evaluate with the `kvjax` model and --log_samples) and the
answers each picks (acc: summed log-likelihood; acc_norm: per byte of the choice). Prints a Markdown
table: max |difference| and answers changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging

import numpy as np

import lm_eval
from eval import harness_lm, scoring, tasks
from kvjax.data import DATA_DIR
from kvjax.loading import load_model
from kvjax.policies import get_policy
from pallas_kernels.cpu_bench import cpu_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--kv", default="fp16,kivi2")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out", default=None, help="a JSON file for the table's rows")
    args = p.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = list(harness_lm.LOCAL_TASKS)
    model = load_model()
    rows = []
    for kv in args.kv.split(","):
        tuned = {} if kv == "fp16" else {"window": args.window, "group_size": args.group_size}
        policy = get_policy(kv, **tuned)
        lm = harness_lm.KvjaxLM(kv=kv, loaded=model, batch_size=args.batch_size, **tuned)
        harness_tasks = harness_lm.local_tasks(names, args.data_dir)
        out = lm_eval.simple_evaluate(model=lm, tasks=harness_tasks, limit=args.limit, log_samples=True)
        by_name = {t.config.task: t for t in harness_tasks}
        for name in names:
            task = by_name[name]
            gold = task.doc_to_text if task.multiple_input else task.doc_to_target  # winogrande: one context per option
            requests = tasks.load_task(name, args.data_dir, args.limit)
            mine = scoring.score_requests(model, requests, policy, args.batch_size)
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            pairs_equal = labels_equal = 0
            theirs = []
            for req, sample in zip(requests, samples, strict=True):
                pairs_equal += [tuple(a) for a in sample["arguments"]] == list(zip(req.contexts, req.continuations))
                labels_equal += gold(sample["doc"]) == req.label
                theirs.append([float(r[0][0]) for r in sample["resps"]])
            diff = max(abs(a - b) for m, t in zip(mine, theirs) for a, b in zip(m, t))
            changed = [int(np.sum(a != b)) for a, b in zip(scoring.picks(requests, mine), scoring.picks(requests, theirs))]
            rows.append({"task": name, "policy": policy.name, "examples": len(requests), "pairs_equal": pairs_equal,
                         "labels_equal": labels_equal, "max_abs_diff": diff, "changed_acc": changed[0],
                         "changed_acc_norm": changed[1], "acc_eval": scoring.accuracy(requests, mine)["acc"],
                         "acc_harness": out["results"][name]["acc,none"]})
    print(f"{cpu_model()}, {datetime.date.today()}, first {args.limit} examples, "
          f"quantized policies at window {args.window}, group {args.group_size}\n")
    print("| task | policy | examples | same pairs | same labels | max abs. difference | answers changed "
          "(acc / acc_norm) | acc: python -m eval / harness |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['policy']} | {r['examples']} | {r['pairs_equal']} | {r['labels_equal']} | "
              f"{r['max_abs_diff']:.2e} | {r['changed_acc']} / {r['changed_acc_norm']} | "
              f"{r['acc_eval']:.3f} / {r['acc_harness']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_model(), "date": datetime.date.today().isoformat(), "limit": args.limit,
                       "window": args.window, "group_size": args.group_size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
