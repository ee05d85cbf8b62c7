"""`python -m kvjax.generate`: stream a completion, then print one stats line.

    python -m kvjax.generate --prompt "The capital of France is" --max-new-tokens 40
    python -m kvjax.generate --prompt "Write a haiku about caches" --chat --temperature 0.7 --top-p 0.9
"""

from __future__ import annotations

import sys

from kvjax import cli, memory
from kvjax.errors import KvjaxError
from kvjax.flags import (SUGGESTED, add_devices_flag, add_kernels_flag, add_policy_flags, add_weights_flag,
                         kernels_from_flags, mesh_from_flags, policy_from_flags, weights_from_flags)
from kvjax.generation import default_dtype, estimate_memory, generate
from kvjax.loading import load_model, read_config, read_tokenizer, resolve_model, weight_bytes
from kvjax.model import DTYPES
from kvjax.sampling import SamplingConfig
from kvjax.weights import Weights


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m kvjax.generate", description="Generate text with a quantized KV cache.")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text; repeat for a batch of prompts (answers are numbered)")
    p.add_argument("--prompt-file", action="append", default=[], type=cli.readable_file,
                   help="a UTF-8 file whose whole text is a prompt (a long document); repeatable, after the --prompts")
    p.add_argument("--model", default=None,
                   help="a .gguf file, a HF checkpoint folder or a hub id (default: $KVJAX_MODEL, "
                        "else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=cli.at_least(1), default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=cli.at_least(0.0, float), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=cli.at_least(0), default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=cli.above(0.0), default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    add_policy_flags(p)
    add_kernels_flag(p)
    add_weights_flag(p)
    add_devices_flag(p)
    p.add_argument("--chunk", type=cli.at_least(1), default=8, help="decode steps per device dispatch while streaming")
    p.add_argument("--max-memory", type=cli.above(0.0), default=None, metavar="GIB",
                   help="refuse a request whose estimated peak memory (weights, KV cache and working memory) "
                        "passes this many GiB (default: what the machine has available)")
    return p


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    args.prompt = args.prompt + [_read_prompt(path) for path in args.prompt_file]
    if not args.prompt:
        raise KvjaxError("give at least one --prompt or --prompt-file")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    dtype = args.dtype or default_dtype()
    kv = policy_from_flags(args)
    source = resolve_model(args.model)
    cfg = read_config(source)  # checks the file and the policy before the weights are read
    if cfg is not None:
        kv.check(cfg)
        if args.max_new_tokens >= cfg.max_position_embeddings:
            raise KvjaxError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {cfg.max_position_embeddings} tokens")
    tokenizer = read_tokenizer(source)
    prompts = args.prompt
    if args.chat and tokenizer is not None:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    lengths = [len(tokenizer.encode(p)) for p in prompts] if tokenizer is not None else None
    lightest = Weights.NATIVE if args.weights == Weights.AUTO.value else Weights(args.weights)  # auto's lightest
    mesh = mesh_from_flags(args)
    if cfg is not None and lengths:  # before anything is built: the weights and kernels that hold the least
        _check_request(cfg, kv, lengths, args, dtype, weight_bytes(source, lightest, DTYPES[dtype]), mesh.size)
    kernels = kernels_from_flags(args)  # after the numbers: on a CPU, auto may build the C++ kernels (once)
    weights = weights_from_flags(args)
    if cfg is not None and lengths:  # what auto chose
        _check_request(cfg, kv, lengths, args, dtype, weight_bytes(source, weights, DTYPES[dtype]), mesh.size,
                       kernels)
    cli.say(f"[kvjax] loading {source}")
    model = load_model(source, DTYPES[dtype], weights)
    if args.chat and tokenizer is None:
        prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    stream = len(prompts) == 1
    shown = []  # the prompt is echoed once the first text arrives (after prefill)

    def show(text):
        if not shown:
            shown.append(print(_heading(args.prompt[0], args.chat), end="", flush=True))
        print(text, end="", flush=True)

    result = generate(model, prompts, args.max_new_tokens, sampling, args.seed, kv, dtype, chunk=args.chunk,
                      on_text=show if stream else None, kernels=kernels, log=cli.say, mesh=mesh)
    if stream:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(args.prompt, result.texts)):
            print(f"--- {i + 1}/{len(prompts)} ---\n{_heading(prompt, args.chat)}{text}")
    print(result.stats_line(), file=sys.stderr)
    return 0


def _check_request(cfg, kv, lengths: list[int], args, dtype: str, held: int | None, devices: int = 1, kernels=None):
    """Refuses, before the model loads, prompts that do not fit the model's context or whose peak
    memory (kvjax.generation.estimate_memory, with the weights' `held` bytes) would pass --max-memory.
    Over several devices each holds the weights and its share of the rows: a GPU's or TPU's memory
    is its own, a CPU's devices share the process's."""
    if min(lengths) == 0:
        raise KvjaxError("empty prompt")
    longest = max(lengths)
    if longest + args.max_new_tokens > cfg.max_position_embeddings:
        raise KvjaxError(f"a prompt of {longest} tokens + {args.max_new_tokens} new tokens exceeds the model's "
                         f"context of {cfg.max_position_embeddings} tokens")
    need = estimate_memory(cfg, kv, -(-len(lengths) // devices), longest, args.max_new_tokens, dtype, held, kernels)
    if devices > 1 and not memory.on_device():  # forced CPU devices: a copy of the weights each, in one process
        need = memory.Estimate(devices * need.weights, devices * need.cache, need.transient)
    limit = int(args.max_memory * memory.GIB) if args.max_memory else memory.available() + memory.current()
    if need.total > limit:
        where = f" on each of {devices} devices" if devices > 1 and memory.on_device() else ""
        raise KvjaxError(f"{len(lengths)} x {longest + args.max_new_tokens} tokens under {kv.name} need about "
                         f"{need.describe()}{where}, more than the {limit / memory.GIB:.2f} GiB this process may use "
                         f"({'--max-memory' if args.max_memory else 'available memory; set --max-memory'}): "
                         f"use fewer or shorter prompts, or a smaller cache (--kv {SUGGESTED})")


def _read_prompt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise KvjaxError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


HEADING_CHARS = 400  # a longer prompt (a document) is echoed by its end only


def _heading(prompt: str, chat: bool) -> str:
    """What is printed before the answer: the prompt it continues (a long one by its last
    HEADING_CHARS characters), or the user's turn in a chat."""
    if len(prompt) > HEADING_CHARS:
        prompt = f"[... {len(prompt) - HEADING_CHARS:,} characters]" + prompt[-HEADING_CHARS:]
    return f"user: {prompt}\nassistant: " if chat else prompt


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
