"""kvjax.memory and the estimate generate checks a request against before loading anything."""

import jax
import jax.numpy as jnp
import pytest

from kvjax import memory
from kvjax.config import get_preset
from kvjax.generation import estimate_memory, prefill
from kvjax.kernels import resolve
from kvjax.model import init_params
from kvjax.policies import get_policy
from pallas_kernels import cpu_attention


def test_parameter_bytes_counts_the_params_tree():
    for name in ("tiny", "SmolLM2-135M"):
        cfg = get_preset(name)
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
        assert memory.parameter_bytes(cfg, jnp.float32) == sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("kernels", ["reference", "native"])
@pytest.mark.parametrize("name, batch", [("fp16", 1), ("fp16", 4), ("kivi2", 4), ("mixed-rule@3", 2)])
def test_the_estimate_covers_what_the_compiled_prefill_holds(name, batch, kernels):
    """The estimate's cache and working memory cover the prefill program's arguments it allocates (the
    cache) and its temporaries, as XLA's own memory analysis of the compiled program counts them, for
    the chunk attention of XLA and of the C++ kernel (which holds no scores)."""
    if kernels == "native" and not cpu_attention.available():
        pytest.skip(f"the native CPU kernel is unavailable: {cpu_attention.unavailable_reason()}")
    cfg = get_preset("SmolLM2-135M")
    policy = get_policy(name)
    length, new = 1500, 4
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: policy.make_cache(cfg, batch, length + new, jnp.float32, kernels))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    compiled = prefill.lower(params, tokens, tokens, cache, cfg=cfg, dtype=jnp.float32).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    need = estimate_memory(cfg, policy, batch, length, new, kernels=resolve(kernels))
    assert need.cache == sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    assert need.transient >= temp
    assert need.weights == memory.parameter_bytes(cfg, jnp.float32)


def test_peak_is_at_least_what_is_held_now():
    memory.reset_peak()
    held = jnp.ones((1 << 24,), jnp.float32).block_until_ready()  # 64 MiB
    now = memory.current()  # read first: the peak, read after, has met it (other threads may allocate)
    assert memory.peak() >= now > held.nbytes
