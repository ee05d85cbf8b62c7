"""Retrieval at long context through each KV-cache policy: RULER-style needle-in-a-haystack tasks.

    python -m eval.longctx --kv fp16,kivi2,streaming,learned-alloc@2.5 --lengths 1024,2048,4096,8192

Each example (eval.retrieval: the tasks, haystacks and depths) is a prompt of exactly `length - its
answer budget` tokens, answered greedily through `kvjax.generate` with the policy's cache, prefill
and decode as a user's; its score is the fraction of the needle's values in the answer. Every
answer is appended to an archive under --cache-dir as soon as it is made: a rerun skips what is
there. Writes longctx.json (every answer), longctx.md (accuracy by length per task and policy, by
depth and length per policy, and each policy against fp16 paired by example), longctx.png (depth x
length heatmaps, one per policy) and longctx-vs-fp16.png to --out; `--report` writes them from the
answers already kept, generating nothing.
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
from eval.longctx_report import markdown, pictures
from eval.retrieval import HAYSTACKS, TASKS, VERSION, Builder, score
from kvjax import cli, sharding
from kvjax.data import DATA_DIR, SHERLOCK_EVAL_TOKENS, read_text, text_path
from kvjax.errors import KvjaxError
from kvjax.flags import (add_devices_flag, add_kernels_flag, add_policy_flags, add_weights_flag, kernels_from_flags,
                         mesh_from_flags, policies_from_flags, weights_from_flags)
from kvjax.generation import generate
from kvjax.loading import load_model, read_config, resolve_model
from pallas_kernels.cpu_bench import cpu_model


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eval.longctx", description=__doc__.splitlines()[0])
    add_policy_flags(p, default="fp16,kivi2")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--haystacks", default=",".join(HAYSTACKS),
                   help="essay (Sherlock's evaluation part), noise (repeated sentences); vt always uses noise")
    p.add_argument("--lengths", type=cli.int_list(512), default=[1024, 2048, 4096, 8192],
                   help="context lengths in tokens: the prompt and the answer's budget")
    p.add_argument("--depths", type=cli.at_least(1), default=5, help="needle depths, evenly spaced from 0 to 1")
    p.add_argument("--samples", type=cli.at_least(1), default=4, help="examples per (task, haystack, length, depth)")
    p.add_argument("--batch-size", type=cli.at_least(1), default=5, help="prompts generated together on each device")
    p.add_argument("--model", default=None, help=".gguf file, HF folder or hub id (default: embedded SmolLM2)")
    add_weights_flag(p)
    add_kernels_flag(p)
    add_devices_flag(p)
    p.add_argument("--data-dir", default=DATA_DIR, help="the shared data folder (default: $KVJAX_DATA, else ../shared/data)")
    p.add_argument("--out", type=cli.output_dir, default="results/longctx", help="folder for longctx.json, .md, .png")
    p.add_argument("--cache-dir", type=cli.output_dir, default="eval_cache",
                   help="where every answer is kept (an interrupted run resumes)")
    p.add_argument("--report", action="store_true",
                   help="only write the report from the answers kept (nothing generated; cells without answers: -)")
    return p


def _names(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise KvjaxError(f"{flag}: unknown {n!r}; known: {', '.join(known)}")
    if not names:
        raise KvjaxError(f"{flag} needs at least one name")
    return names


def cells(tasks: list[str], haystacks: list[str], lengths: list[int], depths: int, samples: int):
    """Every example to answer: (task, haystack, length, depth, index), grouped so that a group's
    prompts have one length (generated together)."""
    grid = np.linspace(0.0, 1.0, depths) if depths > 1 else np.asarray([0.5])
    groups = []
    for length in sorted(set(lengths)):
        for task in tasks:
            for hay in (["noise"] if task == "vt" else haystacks):
                groups.append([(task, hay, length, round(float(d), 4), i) for i in range(samples) for d in grid])
    return groups


def check_lengths(lengths: list[int], cfg):
    if max(lengths) > cfg.max_position_embeddings:
        raise KvjaxError(f"--lengths {max(lengths)} exceeds the model's {cfg.max_position_embeddings} tokens")


def record_key(task: str, hay: str, length: int, depth: float, index: int) -> tuple:
    return task, hay, int(length), round(float(depth), 4), int(index)


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    tasks = _names(args.tasks, TASKS, "--tasks")
    haystacks = _names(args.haystacks, HAYSTACKS, "--haystacks")
    specs = {policy.name: policy for policy in policies_from_flags(args)}
    cfg = read_config(args.model)
    if cfg is not None:  # numbers before files
        check_lengths(args.lengths, cfg)
        for policy in specs.values():
            policy.check(cfg)
    source = resolve_model(args.model)
    path = os.path.join(args.cache_dir, model_tag(source), "longctx.jsonl.gz")
    keys = {name: policy_key(policy, args) for name, policy in specs.items()}
    done = read_answers(path)
    groups = cells(tasks, haystacks, args.lengths, args.depths, args.samples)
    seconds = {}
    if not args.report:
        text_path("sherlock", args.data_dir)
        seconds = answer_all(args, specs, keys, groups, done, path)
    table = {name: [done[(keys[name],) + c] for group in groups for c in group if (keys[name],) + c in done]
             for name in specs}
    report = {"command": "python -m eval.longctx " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name(), "cpu": cpu_model(), "date": datetime.date.today().isoformat(),
              "model": source, "policies": list(specs), "tasks": tasks, "haystacks": haystacks,
              "lengths": sorted(set(args.lengths)), "depths": args.depths, "samples": args.samples, "seconds": seconds,
              "records": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "longctx.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "longctx.md"), "w") as f:
        f.write(text)
    drawn = ", ".join(os.path.basename(f) for f in pictures(report, os.path.join(args.out, "longctx.png")))
    print("\n" + text + f"\nwrote {args.out}/longctx.json, longctx.md, {drawn}")
    return 0


def read_answers(path: str) -> dict[tuple, dict]:
    """(policy key, task, haystack, length, depth, index) -> record, of this VERSION of the examples."""
    done = {}
    for r in read_archive(path)[0]:
        try:
            if r.get("version", 1) == VERSION:
                done[(r["policy"],) + record_key(r["task"], r["haystack"], r["length"], r["depth"], r["index"])] = r
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return done


def answer_all(args, specs: dict, keys: dict, groups: list, done: dict, path: str) -> dict[str, float]:
    """Loads the model and answers every example not in `done`, each appended to the archive at `path`
    (and to `done`) as it is made. -> seconds per policy."""
    mesh = mesh_from_flags(args)
    backend = kernels_from_flags(args)
    held = weights_from_flags(args)
    cli.use_compilation_cache()
    cli.say(f"[kvjax] loading {resolve_model(args.model)}")
    model = load_model(args.model, weights=held)
    for policy in specs.values():
        policy.check(model.cfg)
    check_lengths(args.lengths, model.cfg)  # a model whose config is read only on loading (a hub id)
    essay = model.tokenizer.encode(read_text("sherlock", args.data_dir), bos=False)[:SHERLOCK_EVAL_TOKENS]
    builder = Builder(model.tokenizer, essay)
    seconds = {}
    with open_to_append(path) as archive:
        for name, policy in specs.items():
            todo = [[c for c in group if (keys[name],) + c not in done] for group in groups]
            total = sum(map(len, groups))
            t0 = time.perf_counter()
            with tqdm(total=total, initial=total - sum(map(len, todo)), desc=f"longctx {name}") as bar:
                for group in todo:
                    rows = args.batch_size * sharding.size(mesh)  # --batch-size prompts per device
                    for start in range(0, len(group), rows):
                        batch = group[start:start + rows]
                        examples = [builder.example(*c) for c in batch]
                        result = generate(model, [e.ids for e in examples], max_new_tokens=examples[0].max_new,
                                          kv=policy, kernels=backend, mesh=mesh)
                        for c, e, text in zip(batch, examples, result.texts, strict=True):
                            r = dict(zip(("task", "haystack", "length", "depth", "index"), c),
                                     policy=keys[name], answer=text, score=score(text, e.answers), version=VERSION)
                            done[(keys[name],) + c] = r
                            archive.write(json.dumps(r) + "\n")
                        archive.flush()
                        bar.update(len(batch))
                        bar.set_postfix_str(f"{c[0]} {c[1]} {c[2]}")
            seconds[name] = round(time.perf_counter() - t0, 1)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
