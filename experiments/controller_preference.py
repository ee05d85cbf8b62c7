"""How often a shipped controller *prefers* 4 bits on the first 4096 tokens of each evaluation text,
and where the 4-bit tier (sized from the controller's held-out histogram) would fill up.

    python experiments/controller_preference.py

Features come from an FP16 forward (the quantized cache changes them only slightly). A preference
share above the histogram's means the tier fills early and later tokens go to 2 bits whatever
the controller says; below it, the budget is underused.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.controller import default_controller
from kvjax.data import read_text
from kvjax.features import token_features
from kvjax.loading import load_model
from kvjax.model import forward_with_stats


def main():
    m = load_model(None)
    feats = jax.jit(lambda p, t, q: (lambda o: token_features(o[0], t, q, o[2]))(forward_with_stats(p, m.cfg, t, q)))
    for name in ("wikitext2", "sherlock"):
        ids = np.asarray(m.tokenizer.encode(read_text(name)), np.int32)[:4096]
        f = feats(m.params, jnp.asarray(ids)[None], jnp.arange(len(ids))[None])
        for budget in (3.0, 2.5):
            ctrl = default_controller(budget)
            w = np.asarray(ctrl.widths(f))[0, 4:-128]  # the tokens that leave the window
            cum = np.cumsum(w == 4) / len(w)
            full = int(np.argmax(cum >= ctrl.histogram[4])) if (cum >= ctrl.histogram[4]).any() else None
            print(f"{name} {budget} bits: prefers 4 bits for {np.mean(w == 4):.3f} of {len(w)} left tokens "
                  f"(histogram {ctrl.histogram[4]:.3f}); 4-bit tier full at left token {full}")


if __name__ == "__main__":
    main()
