"""A step writes the cache's arrays in place: the compiled program copies none of them whole.

A layer that reads part of a [l, ...] cache array and then writes into it would make XLA copy the
whole array (every layer, every step) unless the write depends on the read; kvjax.stores.after_reading
makes it so. These tests read the optimized program: without after_reading they find the copies.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from kvjax.config import get_preset
from kvjax.kernels import Kernels, resolve
from kvjax.model import forward, init_params
from kvjax.policies import Bands, get_policy

CFG = get_preset("tiny")
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
# widths that differ by layer (a store per width: kvjax.stores.ByWidth), and a ring whose groups
# move on, copied in one layer and re-encoded in the other
PER_LAYER = Bands("per-layer", bands=(((8, 4), (4, 2)), ((4, 2), 2)), shares=(0.5,), sinks=2, window=8, group_size=4)
HLO_TYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "uint32": "u32"}


def whole_array_copies(name: str, kernels, t: int) -> list[str]:
    """The copies of whole cache arrays in the compiled program of a step of t tokens per sequence."""
    policy = get_policy(name) if name == "fp16" else PER_LAYER if name == PER_LAYER.name else \
        get_policy(name, window=8, group_size=4)
    cache = policy.make_cache(CFG, 2, 64, kernels=kernels)
    step = jax.jit(lambda c, tokens, positions: forward(PARAMS, CFG, tokens, positions, c), donate_argnums=0)
    positions = jnp.broadcast_to(20 + jnp.arange(t), (2, t))
    program = step.lower(cache, jnp.zeros((2, t), jnp.int32), positions).compile().as_text()
    arrays = {(HLO_TYPES[x.dtype.name], tuple(x.shape)) for x in jax.tree_util.tree_leaves(cache)
              if x.ndim == 5 and x.size}
    found = []
    for line in program.splitlines():
        match = re.search(r"= (\w+)\[([\d,]+)\]\{[^}]*\} copy\(", line)
        if match and (match.group(1), tuple(int(v) for v in match.group(2).split(","))) in arrays:
            found.append(line.strip())
    return found


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("name", ["fp16", "kivi2", "kivi2+rot", "band@3", "mixed-static@3", PER_LAYER.name])
def test_a_step_copies_no_whole_cache_array(name, t):
    kernels = [Kernels.REFERENCE]
    if resolve(Kernels.AUTO).kernels is Kernels.NATIVE:  # (t = 4: the chunk kernel reads the arrays in place)
        kernels.append(Kernels.NATIVE)
    for k in kernels:
        assert whole_array_copies(name, k, t) == [], k
