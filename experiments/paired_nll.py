"""Whether two KV-cache policies' perplexities really differ: the mean per-token NLL difference
of B minus A on the same tokens, with a standard error over 128-token blocks (neighbouring
tokens' differences are correlated).

    python experiments/paired_nll.py mixed@2.5 mixed-learned@2.5 --text wikitext2 --segments 2
"""

import argparse

import numpy as np

from eval.perplexity import read_text, segment_nll
from kvjax.loading import load_model
from kvjax.policies import get_policy

BLOCK = 128


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--segments", type=int, default=2)
    args = p.parse_args()
    model = load_model(None)
    ids = np.asarray(model.tokenizer.encode(read_text(args.text)), np.int32)
    nll = {}
    for policy in (args.a, args.b):
        nll[policy] = np.concatenate([segment_nll(model.params, model.cfg, ids[s * args.context:(s + 1) * args.context],
                                                  get_policy(policy))[0] for s in range(args.segments)])
        print(f"{policy}: perplexity {np.exp(nll[policy].mean()):.3f}", flush=True)
    diff = nll[args.b] - nll[args.a]
    blocks = diff[:len(diff) // BLOCK * BLOCK].reshape(-1, BLOCK).mean(axis=1)
    se = blocks.std(ddof=1) / np.sqrt(len(blocks))
    print(f"{args.b} - {args.a}: {diff.mean():+.4f} nats/token, standard error {se:.4f} "
          f"({diff.mean() / se:+.1f} SE over {len(blocks)} blocks of {BLOCK} tokens)")


if __name__ == "__main__":
    main()
