"""The learned allocation: the relaxed cache the trainer runs through, the discrete fit to a budget,
and the allocation files and policies."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import teacher_forced
from kvjax.allocation import DEFAULT_DIR, Allocation, default_allocation, load_allocation, save_allocation
from kvjax.config import get_preset
from kvjax.errors import KvjaxError
from kvjax.layout import WIDTHS
from kvjax.model import forward, init_params
from kvjax.policies import Bands, family_of, get_policy
from kvjax.rotation import Rotation
from train_controller import allocate

CFG = get_preset("tiny")  # 2 layers, head_dim 16
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
WINDOW, GROUP, T = 8, 4, 40


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (1, T)), jnp.int32)


def relaxed_logits(weights, ids, sinks, ends=(1 << 30,), rotate="none"):
    cache = allocate.RelaxedCache(jnp.asarray(weights, jnp.float32), jnp.zeros((1,), jnp.int32), ends, sinks, WINDOW,
                                  GROUP, CFG.num_layers, Rotation.named(rotate))
    return forward(PARAMS, CFG, ids, jnp.arange(T, dtype=jnp.int32)[None], cache)[0]


def one_hot(key_bits, value_bits, bands=1):
    w = np.zeros((CFG.num_layers, 2, bands, 4), np.float32)
    w[:, 0, :, WIDTHS.index(key_bits)] = 1
    w[:, 1, :, WIDTHS.index(value_bits)] = 1
    return w


def exact_logits(policy, ids):
    return teacher_forced.score(PARAMS, CFG, ids, jnp.arange(T, dtype=jnp.int32)[None], policy, T)[0]


def test_relaxed_cache_at_16_bits_is_the_fp16_cache():
    """Equal up to summation order: the two attend in different blocks, and a K/V that differs in its
    last float32 bit may round to a neighbouring float16 when stored (about 1e-4 in these logits)."""
    ids = tokens()
    np.testing.assert_allclose(relaxed_logits(one_hot(16, 16), ids, sinks=2), exact_logits(get_policy("fp16"), ids),
                               atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bits, rotate", [(2, "none"), (4, "none"), (8, "none"), (2, "both")])
def test_relaxed_values_match_the_exact_scorer(bits, rotate):
    """Values are quantized per token as they leave the window in both paths (keys wait for whole
    groups in the exact one, so they are compared at 16 bits here); rotated as the policy rotates them."""
    ids = tokens(1)
    policy = Bands("v", bands=((16, bits),), sinks=3, window=WINDOW, group_size=GROUP, rotate=rotate)
    np.testing.assert_allclose(relaxed_logits(one_hot(16, bits), ids, sinks=3, rotate=rotate),
                               exact_logits(policy, ids), atol=2e-4, rtol=2e-4)
    if rotate != "none":  # the rotation changes what 2-bit codes keep
        assert float(jnp.abs(relaxed_logits(one_hot(16, bits), ids, sinks=3) - exact_logits(policy, ids)).max()) > 1e-3


def test_relaxed_keys_move_the_logits_towards_fp16_with_more_bits():
    ids = tokens(2)
    fp16 = relaxed_logits(one_hot(16, 16), ids, sinks=0)
    errors = [float(jnp.abs(relaxed_logits(one_hot(b, 16), ids, sinks=0) - fp16).mean()) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0, errors


def test_initial_logits_average_the_budget():
    for budget in (2.25, 2.5, 3.0, 6.0):
        theta = allocate.initial_logits(CFG.num_layers, 3, budget)
        assert float(allocate.expected_bits(jnp.asarray(theta), (0.125, 0.375, 0.5))) == pytest.approx(budget, abs=1e-4)


@pytest.mark.parametrize("budget", [2.25, 2.5, 3.0])
def test_discrete_allocation_fits_the_budget_and_narrows_with_age(budget):
    shares = (0.125, 0.375, 0.5)
    theta = np.random.default_rng(3).normal(size=(30, 2, 3, 4)).astype(np.float32) * 3
    idx = allocate.discrete_allocation(theta, shares, budget)
    bits = (np.asarray(WIDTHS)[idx] * np.asarray(shares)).sum(-1).mean()
    assert budget - 2 * 0.125 / 60 - 1e-9 <= bits <= budget + 1e-9  # the smallest step: 2 -> 4 bits in the newest band
    assert (np.diff(idx, axis=-1) <= 0).all()


def test_training_moves_the_logits_and_gives_a_policy(tmp_path):
    model = types.SimpleNamespace(cfg=CFG, params=PARAMS)
    segments = [np.asarray(tokens(s)[0]) for s in range(2)]
    theta, history = allocate.train(model, segments, 3.0, steps=2, sinks=2, window=WINDOW, group_size=GROUP,
                                    log=lambda s: None)
    assert np.isfinite(theta).all() and len(history) == 2
    assert not np.allclose(theta, allocate.initial_logits(CFG.num_layers, 3, 3.0))
    alloc = allocate.to_allocation(theta, allocate.DEFAULT_SHARES, 3.0, sinks=2, window=WINDOW, group_size=GROUP)
    assert alloc.average_bits <= 3.0 + 1e-9
    path = str(tmp_path / "a.json")
    save_allocation(alloc, path)
    assert load_allocation(path) == alloc
    policy = get_policy("learned-alloc@3", allocation=path)
    # the bands rounded to whole groups of the tiny model's context shift its average a little
    assert policy.average_bits(CFG) == pytest.approx(alloc.average_bits, abs=0.1)
    assert policy.make_cache(CFG, 1, 64) is not None


def test_a_rotated_policy_takes_an_allocation_trained_rotated(tmp_path):
    alloc = Allocation(keys=((4, 2),), values=((2, 2),), shares=(), sinks=2, window=WINDOW, group_size=GROUP,
                       rotate="both")
    path = str(tmp_path / "rot.json")
    save_allocation(alloc, path)
    assert load_allocation(path).rotate == "both"
    assert get_policy("learned-alloc@2.5+rot", allocation=path).layout(CFG, 64).rotation.name == "both"
    with pytest.raises(KvjaxError, match="trained with rotate=both, the policy stores rotate=none: name it "
                                         r"learned-alloc@2.5\+rot"):
        get_policy("learned-alloc@2.5", allocation=path)


def test_allocation_files_are_checked():
    with pytest.raises(KvjaxError, match="one width in"):
        Allocation(keys=((3, 2),), values=((2, 2),), shares=())
    with pytest.raises(KvjaxError, match="bands = shares"):
        Allocation(keys=((2, 2),), values=((2, 2),), shares=(0.5,))
    alloc = Allocation(keys=((4, 4),), values=((2, 2),), shares=())
    with pytest.raises(KvjaxError, match="averages 3.000 bits, not 2.5"):
        get_policy("learned-alloc@2.5", allocation=alloc)


def test_the_shipped_allocations_meet_their_budgets():
    shipped = sorted(os.listdir(DEFAULT_DIR))
    assert {"smollm2-135m-instruct-2.5bits.json", "smollm2-135m-instruct-2.4bits-rot.json"} <= set(shipped)
    for file in shipped:  # smollm2-135m-instruct-<B>bits[-rot].json
        budget_text, _, rotated = file.removeprefix("smollm2-135m-instruct-").removesuffix(".json").partition("bits")
        budget, rotate = float(budget_text), "both" if rotated == "-rot" else "none"
        policy = get_policy(f"learned-alloc@{budget:g}{'+rot' if rotated else ''}")
        assert budget - 0.01 <= default_allocation(budget, rotate).average_bits <= budget + 1e-9
        assert budget - 0.01 <= policy.average_bits(get_preset("SmolLM2-135M")) <= budget + 1e-9
        assert policy.rotate == rotate
    # the --kv help names every shipped budget, read from the folder (here "2.25, 2.5, 3; +rot: 2.25, ...")
    plain, rotated = family_of("learned-alloc").help.partition("(shipped: ")[2].partition(")")[0].split("; +rot: ")
    names = {f"smollm2-135m-instruct-{b}bits.json" for b in plain.split(", ")}
    assert names | {f"smollm2-135m-instruct-{b}bits-rot.json" for b in rotated.split(", ")} == set(shipped)


def test_eval_keeps_the_scores_of_two_allocations_apart():
    from eval.archive import cache_suffix
    one = get_policy("learned-alloc@2.5")
    two = get_policy("learned-alloc@3", allocation=Allocation(keys=((4,) * 30,), values=((2,) * 30,), shares=()))
    assert cache_suffix(one, "-R16").startswith("-R16-a") and cache_suffix(one, "-R16") != cache_suffix(two, "-R16")
