"""Reference timing: HF transformers `generate` on the default model (needs torch + transformers + accelerate).

    python experiments/hf_decode_speed.py --context 1024
"""

import argparse
import os
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from kvjax.loading import default_model_path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.context)))

    def timed(new_tokens):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - t0

    with torch.no_grad():
        timed(4)  # warm-up
        per_token = (timed(args.steps + 1) - timed(1)) / args.steps  # decode only: prefill cancels out
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"context {args.context}: decode {1e3 * per_token:.1f} ms/token")


if __name__ == "__main__":
    main()
