"""Writes a copy of a shipped controller under which every token prefers the widest tier, so the
tiers fill in arrival order: the first left tokens take the 4-bit tier (sized by the controller's
held-out histogram) until it is full, and the rest go to 2 bits. A diagnostic baseline: what the
learned controller gains over arrival order alone.

    python experiments/arrival_order_controller.py 3 /tmp/arrival3.npz
    python -m eval.perplexity --kv mixed-learned@3 --controller /tmp/arrival3.npz --text wikitext2
"""

import dataclasses
import sys

from kvjax.controller import default_controller, save_controller


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: python {sys.argv[0]} BUDGET_BITS OUT.npz")
    ctrl = default_controller(float(sys.argv[1]))
    # a per-bit bias of -100 makes 16 bits everyone's choice; 16 and 8 have no room at this
    # histogram, so each token takes the nearest tier with room: 4 bits while it lasts, then 2
    save_controller(sys.argv[2], dataclasses.replace(ctrl, bias=-100.0))
    print(f"wrote {sys.argv[2]} (histogram {ctrl.histogram})")


if __name__ == "__main__":
    main()
