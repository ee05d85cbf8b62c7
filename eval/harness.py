"""lm-evaluation-harness tasks through a kvjax policy, offline (pip install -e ".[harness]").

    python -m eval.harness --tasks hellaswag,arc_easy --model_args kv=learned-alloc@2.5 --limit 200

The harness's own prompts, metrics and table, with kvjax as its model (eval.harness_lm: the exact
teacher-forced scorer for log-likelihoods, kvjax.generate for generation). hellaswag, arc_easy,
arc_challenge, openbookqa, winogrande and boolq read the data folder's validation splits (--data-dir,
else $KVJAX_DATA, else ../shared/data; arc_* and openbookqa are scored on validation, where the
harness's default is their test split); any other harness task loads as the harness loads it.
Prints the harness's table; --output_path writes its results (and, with --log_samples, every
example's requests and responses) as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

from kvjax import cli
from kvjax.data import DATA_DIR
from kvjax.errors import KvjaxError
from kvjax.flags import policy_from_flags
from kvjax.loading import read_config, resolve_model


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eval.harness", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", required=True, help="comma-separated harness task names")
    p.add_argument("--model_args", default="", help="kv=POLICY,window=,group_size=,sinks=,controller=,allocation=,"
                                                    "model=,dtype=,kernels=,weights=,devices=,max_gen_toks= (eval.harness_lm)")
    p.add_argument("--limit", type=cli.at_least(1), default=None, help="first N examples of each task")
    p.add_argument("--num_fewshot", type=cli.at_least(0), default=None, help="few-shot examples (task default)")
    p.add_argument("--batch_size", type=cli.at_least(1), default=8, help="sequences per forward pass on each device")
    p.add_argument("--data-dir", default=DATA_DIR, help="the shared data folder (default: $KVJAX_DATA, else ../shared/data)")
    p.add_argument("--output_path", type=cli.output_file, default=None, help="a JSON file for the results")
    p.add_argument("--log_samples", action="store_true", help="with --output_path: every example's requests and responses")
    return p


def model_args(text: str) -> dict:
    """"kv=kivi2,window=16" -> {"kv": "kivi2", "window": 16}: the harness's own parsing."""
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(text)
    except (ValueError, IndexError) as e:
        raise KvjaxError(f"--model_args {text!r}: {e}") from None


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.log_samples and not args.output_path:
        raise KvjaxError("--log_samples needs --output_path")
    if importlib.util.find_spec("lm_eval") is None:
        raise KvjaxError('lm-evaluation-harness is not installed: pip install -e ".[harness]"')
    from eval import harness_lm

    margs = model_args(args.model_args)
    if "batch_size" in margs:
        raise KvjaxError("--model_args: give the batch size as --batch_size")
    known = [a for a in harness_lm.MODEL_ARGS if a != "batch_size"]
    if set(margs) - set(known):
        raise KvjaxError(f"--model_args: unknown {', '.join(sorted(set(margs) - set(known)))}; known: {', '.join(known)}")
    flag_names = ("kv", "window", "group_size", "sinks", "controller", "allocation", "kernels", "weights")
    policy = policy_from_flags(harness_lm.policy_args(**{k: margs[k] for k in flag_names if k in margs}))
    cfg = read_config(margs.get("model"))
    if cfg is not None:
        policy.check(cfg)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise KvjaxError("--tasks needs at least one name")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes on custom datasets
    tasks = harness_lm.local_tasks(names, args.data_dir)
    cli.use_compilation_cache()
    cli.say(f"[kvjax] loading {resolve_model(margs.get('model'))}")
    lm = harness_lm.KvjaxLM(**margs, batch_size=args.batch_size)

    import lm_eval
    from lm_eval.utils import make_table

    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                      log_samples=args.log_samples, batch_size=args.batch_size)
    results["config"]["model_args"] = args.model_args
    print(make_table(results))
    if args.output_path:
        with open(args.output_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
