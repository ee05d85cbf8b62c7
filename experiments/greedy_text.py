"""Greedy text of every shipped policy on the default model, to compare two versions of kvjax.

Three prompts in one batch (700 and 350 tokens of Sherlock's text, whose tokens leave the 16-bit
window during prefill, and a short one), 24 new tokens each; writes {policy: [token ids per prompt]}
as JSON. Run it from two checkouts and compare the files:

    python experiments/greedy_text.py --out new.json
    (cd ../old-checkout && python /path/to/experiments/greedy_text.py --out old.json)
    python experiments/greedy_text.py --compare old.json new.json
"""

import argparse
import json
import os

import kvjax
from kvjax.data import text_path

POLICIES = ("fp16,kivi4,kivi2,int8-sink,streaming,band@3,learned-alloc@2.25,learned-alloc@2.5,learned-alloc@3,"
            "mixed-learned@3")


def prompts(model) -> list[str]:
    with open(text_path("sherlock")) as f:  # the file as it is, from its 20,000th character
        ids = model.tokenizer.encode(f.read()[20000:26000])
    return [model.tokenizer.decode(ids[:700]), "The capital of France is", model.tokenizer.decode(ids[900:1250])]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the tokens of every policy here (JSON)")
    p.add_argument("--kv", default=POLICIES, help="comma-separated policies")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two such files instead")
    args = p.parse_args()
    if args.compare:
        a, b = (json.load(open(path)) for path in args.compare)
        for name in a:
            diverge = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a[name], b[name])]
            print(f"{name:20} {'same' if all(d is None for d in diverge) else f'first difference at {diverge}'}")
        return
    model = kvjax.load_model()
    out = {}
    for name in args.kv.split(","):
        out[name] = kvjax.generate(model, prompts(model), max_new_tokens=24, kv=name).tokens
        print(name, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(out, open(args.out, "w"))


if __name__ == "__main__":
    main()
