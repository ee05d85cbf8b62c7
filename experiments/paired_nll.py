"""Whether two KV-cache policies' perplexities really differ: the mean per-token NLL difference
of B minus A on the same tokens, with a standard error over 128-token blocks (neighbouring
tokens' differences are correlated).

    python experiments/paired_nll.py mixed@2.5 mixed-learned@2.5 --text wikitext2 --segments 2
"""

import argparse

import numpy as np

from eval.perplexity import PAIRED_BLOCK, paired_difference, segment_nll
from kvjax.data import read_text
from kvjax.loading import load_model
from kvjax.policies import get_policy


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
    mean, se = paired_difference(nll[args.a], nll[args.b])
    print(f"{args.b} - {args.a}: {mean:+.4f} nats/token, standard error {se:.4f} "
          f"({mean / se:+.1f} SE over {len(nll[args.a]) // PAIRED_BLOCK} blocks of {PAIRED_BLOCK} tokens)")


if __name__ == "__main__":
    main()
