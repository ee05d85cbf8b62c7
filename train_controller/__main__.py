"""`python -m train_controller`: traces -> training -> a controller file, a loss curve and one result line.

    python -m train_controller --budget-bits 3.0 --steps 2000 --out runs/b3

Steps: tokenize the training text (train_controller.data: Sherlock Holmes after the tokens
eval.perplexity scores), trace it with the FP16 model (train_controller.traces; chunks on
disk, reused), count token frequencies on the training split, train (train_controller.train;
Orbax checkpoints in OUT/checkpoints, resumed automatically), set the bias that meets the
budget on the held-out split, and write OUT/controller.npz and OUT/loss.png. The last line:

    held-out distortion X (random at this histogram Y) | average bits B | histogram 2:.. 4:.. 8:.. 16:..
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

from kvjax import cli
from kvjax.data import DATA_DIR
from kvjax.errors import KvjaxError
from kvjax.flags import add_devices_flag, add_weights_flag, mesh_from_flags, weights_from_flags
from kvjax.layout import DEFAULT_GROUP, DEFAULT_SINKS, DEFAULT_WINDOW
from train_controller import data


def _parser():
    p = cli.ArgumentParser(prog="python -m train_controller", description="Train the learned KV precision controller.")
    p.add_argument("--model", default=None, help="a .gguf file, HF folder or hub id (default: the embedded model)")
    add_weights_flag(p)
    p.add_argument("--budget-bits", type=cli.at_least(2.0, float), default=3.0,
                   help="target average bits of left tokens (2 to 16)")
    p.add_argument("--steps", type=cli.at_least(1), default=2000, help="training steps")
    p.add_argument("--out", type=cli.output_dir, default="runs/controller",
                   help="output folder (checkpoints, traces, controller)")
    p.add_argument("--traces", type=cli.output_dir, default=None,
                   help="trace folder (default OUT/traces; share it between budgets)")
    p.add_argument("--text", default=None, help="train on this UTF-8 file instead of the default text")
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: $KVJAX_DATA, else ../shared/data)")
    p.add_argument("--trace-tokens", type=cli.at_least(1), default=65536, help="training tokens to trace (at most)")
    p.add_argument("--chunk", type=cli.at_least(1), default=1024, help="tokens per traced sequence")
    p.add_argument("--window", "--residual", dest="window", type=cli.at_least(1), default=DEFAULT_WINDOW,
                   help="the policy's 16-bit window W (KIVI's residual R)")
    p.add_argument("--group-size", type=cli.at_least(1), default=DEFAULT_GROUP, help="quantization group size G")
    p.add_argument("--sinks", type=cli.at_least(0), default=DEFAULT_SINKS, help="attention-sink tokens kept in 16 bits")
    p.add_argument("--heldout", type=cli.above(0.0), default=0.1, help="share of trace chunks held out (the text's end)")
    p.add_argument("--min-queries", type=cli.at_least(0), default=64,
                   help="tokens seen quantized by fewer future queries get no distortion target")
    p.add_argument("--batch", type=cli.at_least(1), default=4096, help="tokens per training step")
    p.add_argument("--lr", type=cli.above(0.0), default=3e-3, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--hidden", type=cli.int_list(1), default=[128, 128], help="MLP hidden widths, comma-separated")
    p.add_argument("--checkpoint-every", type=cli.at_least(1), default=200, help="steps between Orbax checkpoints")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch-order seed")
    add_devices_flag(p)
    p.add_argument("--fresh", action="store_true", help="delete OUT/checkpoints first")
    p.add_argument("--controller-out", type=cli.output_file, default=None,
                   help="controller file (default OUT/controller.npz)")
    return p


def main(argv=None) -> int:
    return cli.run(lambda: run(_check(_parser().parse_args(argv))),
                   interrupted="interrupted (rerun the same command to resume from the last checkpoint)")


def _check(args):
    """What argparse cannot check alone; all of it before the model loads."""
    if args.budget_bits > 16:
        raise KvjaxError(f"argument --budget-bits: must be <= 16, got {args.budget_bits:g}")
    if args.heldout >= 1:
        raise KvjaxError(f"argument --heldout: must be < 1, got {args.heldout:g}")
    if args.chunk % args.group_size or args.chunk <= args.window:
        raise KvjaxError(f"--chunk {args.chunk} must be a multiple of --group-size {args.group_size} and longer "
                         f"than --window {args.window}")
    if args.trace_tokens < args.chunk:
        raise KvjaxError(f"--trace-tokens {args.trace_tokens} is less than one --chunk of {args.chunk}")
    args.mesh = mesh_from_flags(args)
    if args.batch % args.mesh.size:
        raise KvjaxError(f"--batch {args.batch} is not a multiple of the {args.mesh.size} devices")
    data.check_training_text(args.text, args.data_dir or DATA_DIR)
    return args


def run(args) -> int:
    from kvjax.controller import Controller, model_signature, save_controller
    from kvjax.loading import load_model, resolve_model
    from kvjax.policies import max_budget
    from train_controller import traces, train

    hidden = tuple(args.hidden)
    t0 = time.perf_counter()
    cli.say(f"[kvjax] loading {resolve_model(args.model)}")
    model = load_model(args.model, weights=weights_from_flags(args))
    ids = data.training_ids(model.tokenizer, args.text, args.data_dir or DATA_DIR, args.trace_tokens)
    ids = ids[:len(ids) // args.chunk * args.chunk]
    files = traces.write_traces(model, ids, args.traces or os.path.join(args.out, "traces"), args.chunk,
                                args.window, args.sinks, args.group_size)
    n_held = max(1, round(len(files) * args.heldout))
    if len(files) - n_held < 1:
        raise KvjaxError(f"{len(files)} trace chunk(s) leave nothing to train on after holding out {n_held}")
    train_tr, held_tr = traces.load_traces(files[:-n_held]), traces.load_traces(files[-n_held:])
    counts = data.token_counts(train_tr["tokens"], model.cfg.vocab_size)
    train_set, norm, scale = train.prepare(train_tr, counts, args.min_queries)
    held_set, _, _ = train.prepare(held_tr, counts, args.min_queries, norm, scale)

    lam = train.oracle_lambda(train_set.costs[train_set.weight], args.budget_bits)
    cfg = train.TrainConfig(budget_bits=args.budget_bits, steps=args.steps, batch=args.batch, lr=args.lr,
                            hidden=hidden, seed=args.seed, checkpoint_every=args.checkpoint_every, lambda_init=lam)
    ckpt = os.path.join(args.out, "checkpoints")
    if args.fresh and os.path.isdir(ckpt):
        shutil.rmtree(ckpt)
    run_info = {"train_tokens": int(len(train_tr["tokens"])), "min_queries": args.min_queries,
                "trace_files": len(files), "norm": [np.asarray(x).tolist() for x in norm], "scale": scale}
    mesh = args.mesh
    print(f"{len(train_tr['tokens'])} training / {len(held_tr['tokens'])} held-out tokens, "
          f"{int(train_set.weight.sum())} with targets; {mesh.size} device(s)", flush=True)
    state = train.train(cfg, train_set, ckpt, run_info, mesh)

    logits = train.logits_of(state["params"], cfg, held_set.inputs)
    bias = train.calibrate_bias(logits, args.budget_bits)
    result = train.evaluate(logits, bias, held_set)
    ctrl = Controller(params=state["params"], hidden=hidden, mean=norm[0], std=norm[1], counts=counts,
                      budget_bits=args.budget_bits, histogram=result["histogram"], bias=bias,
                      model=model_signature(model.cfg),
                      info={"model": model.cfg.name, "steps": args.steps, "train_tokens": run_info["train_tokens"],
                            "heldout": {k: v for k, v in result.items() if k != "histogram"},
                            "traces": {"chunk": args.chunk, "window": args.window, "sinks": args.sinks,
                                       "group_size": args.group_size}})
    out = args.controller_out or os.path.join(args.out, "controller.npz")
    save_controller(out, ctrl)
    _plot(np.asarray(state["history"]), os.path.join(args.out, "loss.png"), args.budget_bits)
    if args.budget_bits > max_budget():
        print(f"note: budgets above {max_budget():.2f} bits are not accepted by mixed policies", file=sys.stderr)
    hist = " ".join(f"{w}:{s:.3f}" for w, s in result["histogram"].items())
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KB) and {os.path.join(args.out, 'loss.png')} "
          f"in {time.perf_counter() - t0:.0f} s")
    print(f"held-out distortion {result['distortion']:.4f} (random at this histogram {result['random_distortion']:.4f})"
          f" | average bits {result['bits']:.3f} | histogram {hist}")
    return 0


def _plot(history: np.ndarray, path: str, budget: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(history) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, history[:, 0], label="loss")
    a.plot(steps, history[:, 1], label="expected distortion")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.legend()
    b.plot(steps, history[:, 2], label="expected bits")
    b.axhline(budget, color="k", ls="--", label="budget")
    b.set_xlabel("step")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
