"""`python -m kvjax.generate`: stream a completion, then print one stats line.

    python -m kvjax.generate --prompt "The capital of France is" --max-new-tokens 40
    python -m kvjax.generate --prompt "Write a haiku about caches" --chat --temperature 0.7 --top-p 0.9
"""

from __future__ import annotations

import argparse
import sys

from kvjax.errors import KvjaxError
from kvjax.generation import default_dtype, generate
from kvjax.loading import load_model
from kvjax.model import DTYPES
from kvjax.policies import add_policy_flags, policy_from_flags
from kvjax.sampling import SamplingConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise KvjaxError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kvjax.generate", description="Generate text with a quantized KV cache.")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of prompts")
    p.add_argument("--model", default=None,
                   help="a .gguf file, a HF checkpoint folder or a hub id (default: $KVJAX_MODEL, "
                        "else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    add_policy_flags(p)
    p.add_argument("--chunk", type=int, default=8, help="decode steps per device dispatch while streaming")
    return p


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.chunk < 1:
            raise KvjaxError(f"--chunk must be >= 1, got {args.chunk}")
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        dtype = args.dtype or default_dtype()
        kv = policy_from_flags(args)
        model = load_model(args.model, DTYPES[dtype])
        prompts = args.prompt
        if args.chat:
            prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        stream = len(prompts) == 1
        shown = []  # the prompt is echoed once the first text arrives (after prefill)

        def show(text):
            if not shown:
                shown.append(print(args.prompt[0], end=""))
            print(text, end="", flush=True)

        result = generate(model, prompts, args.max_new_tokens, sampling, args.seed, kv, dtype,
                          chunk=args.chunk, on_text=show if stream else None, kernels=args.kernels)
        if stream:
            print()
        else:
            for prompt, text in zip(args.prompt, result.texts):
                print(f"{prompt}{text}\n")
        print(result.stats_line(), file=sys.stderr)
        return 0
    except KvjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
