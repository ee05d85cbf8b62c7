"""Quantized cache policies: teacher-forced scoring equals step-by-step decoding, for every policy.

The proofs decode through `replay.Replay`, which stores the teacher-forced path's K/V and features
in the step-by-step cache, so that both paths quantize bit-identical inputs whatever the CPU's
summation order (see tests/replay.py); the drift it records bounds how far the model's own K/V
and features differ between the paths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from kvjax import teacher_forced
from kvjax.cache import DenseCache
from kvjax.config import get_preset
from kvjax.controller import INPUTS, Controller, ControllerMLP, model_signature
from kvjax.errors import KvjaxError
from kvjax.features import forward_recording_features
from kvjax.model import forward, init_params
from kvjax.policies import PolicySpec, make_cache, parse_policy, resolve_widths
from kvjax.tiered import TieredCache
from replay import Replay

CFG = get_preset("tiny")  # head_dim 16
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
# Small window and groups so that short sequences cross many window and group boundaries.
WINDOW, GROUP = 8, 4
POLICIES = ["kivi2", "kivi4", "kivi8", "int8-sink", "int4-sink", "int2-sink", "streaming", "mixed@3", "mixed@2.5", "mixed-rule@3",
            "mixed-rule@4", "mixed-learned@3", "mixed-random@3", "band@3", "band@2.5"]


def tiny_controller(budget=3.0, seed=1):
    """A small random controller for the tiny model (its widths vary from token to token)."""
    params = ControllerMLP((8, 8)).init(jax.random.PRNGKey(seed), jnp.zeros((1, len(INPUTS))))["params"]
    counts = np.random.default_rng(seed).integers(0, 50, CFG.vocab_size)
    return Controller(params=jax.tree_util.tree_map(np.asarray, params), hidden=(8, 8),
                      mean=np.asarray([5.0, 0.05, 5.5, 3.9, 3.9, 0.5], np.float32),
                      std=np.asarray([0.05, 0.01, 0.2, 0.1, 0.2, 0.3], np.float32),
                      counts=counts, budget_bits=budget, histogram={2: 0.7, 4: 0.2, 8: 0.05, 16: 0.05},
                      bias=0.0, model=model_signature(CFG))


def spec_of(name, **kw):
    if "learned" in name or "random" in name:
        kw.setdefault("controller", tiny_controller(float(name.split("@")[1])))
    return parse_policy(name, window=WINDOW, group_size=GROUP, **kw)


# Largest difference between the two paths' own K/V (and features) that the proofs accept: float32
# rounding through two layers, far below a quantization step.
DRIFT = 1e-4


def reference(spec, tokens, positions, capacity):
    """Teacher-forced logits [b, T, v], K/V and features of `tokens` under `spec`."""
    logits, tf, features = teacher_forced._score(PARAMS, tokens, positions, cfg=CFG, spec=spec, capacity=capacity,
                                                 dtype=jnp.float32)
    return logits, tf, features


@jax.jit
def _step(cache, tok, pos):
    return forward_recording_features(PARAMS, CFG, tok, pos, cache)


def decode_steps(cache, tokens, positions, start=0):
    """Step-by-step decoding of tokens[:, start:] into `cache`: logits [b, T - start, v] and the cache."""
    out = []
    for t in range(start, tokens.shape[1]):
        logits, cache = _step(cache, tokens[:, t:t + 1], positions[:, t:t + 1])
        out.append(logits[:, 0])
    return jnp.stack(out, axis=1), cache


def decode_all(spec, tokens, positions, capacity, kernels="auto"):
    """Step-by-step decoding from an empty cache that replays the teacher-forced K/V and features:
    logits [b, T, v], the final cache (unwrapped), and the teacher-forced logits."""
    want, tf, features = reference(spec, tokens, positions, capacity)
    empty = make_cache(spec, CFG, tokens.shape[0], capacity).replace(kernels=kernels)
    got, cache = decode_steps(Replay.around(empty, tf, features), tokens, positions)
    assert float(cache.drift.max()) < DRIFT, cache.drift
    return got, cache.inner, want


def ragged_batch(T=41, short=33, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, T)))
    positions = np.tile(np.arange(T), (2, 1))
    positions[1, short:] = -1
    return tokens, jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("name", POLICIES)
def test_teacher_forced_equals_step_by_step_decode(name):
    spec = spec_of(name)
    tokens, positions = ragged_batch()
    capacity = 44
    got, cache, want = decode_all(spec, tokens, positions, capacity)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-5)
    # the policy really changed something: not equal to the full-precision forward
    full, _ = forward(PARAMS, CFG, tokens, positions)
    assert float(jnp.abs(full - got)[valid].max()) > 1e-3
    # nothing dropped unless evicting; every left token is in exactly one tier
    tiers = {k: np.asarray(v) for k, v in cache.tokens_per_tier().items()}
    stored = sum(tiers.values())
    lengths = valid.sum(1)
    if spec.evict:
        np.testing.assert_array_equal(stored, np.minimum(lengths, spec.sinks + spec.window))
    else:
        np.testing.assert_array_equal(stored, lengths)


@struct.dataclass
class _NudgedKV(Replay):
    """Replay, with the step's own K/V moved one ulp up before they reach it."""

    def update(self, layer, k, v, positions):
        up = lambda x: jnp.nextafter(x, jnp.full_like(x, jnp.inf))
        return super().update(layer, up(k), up(v), positions)


def test_an_ulp_in_the_decoded_kv_changes_nothing():
    """The proofs hold whatever the last bit of the K/V the model computes step by step: int8-sink,
    whose prefill once failed on an Intel Xeon from one flipped code, decodes bit-identically."""
    spec = spec_of("int8-sink")
    tokens, positions = ragged_batch(T=20, short=20, seed=1)
    _, tf, features = reference(spec, tokens, positions, 24)
    runs = [decode_steps(wrap.around(make_cache(spec, CFG, 2, 24), tf, features), tokens, positions)[0]
            for wrap in (Replay, _NudgedKV)]
    np.testing.assert_array_equal(*runs)


@pytest.mark.parametrize("name", ["kivi2", "kivi4", "int8-sink", "mixed@3"])
def test_pallas_kernels_decode_equals_reference(name):
    """Decoding through the Pallas kernels (quantize + pack, fused attention; interpreted on CPU)
    equals the codecs + jnp reference path."""
    spec = spec_of(name)
    tokens, positions = ragged_batch(T=27, short=22, seed=3)
    fused = "interpret" if jax.default_backend() == "cpu" else "kernel"
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        want, _, _ = decode_all(spec, tokens, positions, 30, kernels="reference")
        got, _, _ = decode_all(spec, tokens, positions, 30, kernels=fused)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["kivi2", "int4-sink", "mixed@3"])
def test_prefill_with_pallas_kernels_is_bit_identical(name):
    """Prompt prefill writes the same codes, scales and zeros through the quantize + pack kernels."""
    spec = spec_of(name)
    tokens, positions = ragged_batch(T=29, short=25, seed=4)
    caches = [teacher_forced.prefill(PARAMS, CFG, tokens, positions,
                                     make_cache(spec, CFG, 2, 32).replace(kernels=mode))[1]
              for mode in ("reference", "interpret")]
    assert int(jnp.sum(caches[0].counts)) > 0  # tokens did reach the quantized tiers
    for a, b in zip(*(jax.tree_util.tree_leaves(c) for c in caches)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["kivi2", "int8-sink", "streaming", "mixed-rule@3", "mixed-learned@3", "band@2.5"])
def test_prefill_then_decode_equals_teacher_forced(name):
    """A prompt of P tokens prefilled, then decoded step by step, equals teacher forcing of the whole.

    The prompt is given at the full length with its tail as padding (position -1): the prefill then
    runs the same program on the same shapes as the reference, and padding is masked before any
    reduction, so the prompt's logits, K/V and widths are bit-identical to the reference's (not
    only close: a different matmul shape could flip a code, see tests/replay.py). The decode steps
    replay the reference K/V.
    """
    spec = spec_of(name)
    tokens, positions = ragged_batch(T=37, short=37, seed=1)
    capacity, P = 40, 23
    want, tf, features = reference(spec, tokens, positions, capacity)
    prompt_positions = positions.at[:, P:].set(-1)
    logits, cache = teacher_forced.prefill(PARAMS, CFG, tokens, prompt_positions, make_cache(spec, CFG, 2, capacity))
    np.testing.assert_array_equal(logits[:, :P], want[:, :P])
    got, cache = decode_steps(Replay.around(cache, tf, features), tokens, positions, start=P)
    assert float(cache.drift.max()) < DRIFT, cache.drift
    np.testing.assert_allclose(got, want[:, P:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["kivi2", "streaming", "int8-sink", "mixed@3", "fp16"])
def test_perplexity_summarizes_the_widths_of_left_tokens(name):
    """eval.perplexity's width record: the tokens older than the window at the last query, sinks
    excluded, at the widths the policy gave them (0 = evicted)."""
    from eval.perplexity import segment_nll, width_summary

    spec = name if name == "fp16" else spec_of(name)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 40)
    nll, left = segment_nll(PARAMS, CFG, tokens, spec)
    bits, shares = width_summary(left)
    assert nll.shape == (39,) and np.isfinite(nll).all()
    if name == "fp16":
        assert left.size == 0 and (bits, shares) == (16.0, {"16": 1.0})
        return
    assert len(left) == 40 - WINDOW - spec.sinks  # positions sinks..31 are 8+ older than position 39
    assert abs(sum(shares.values()) - 1) < 1e-9 and bits == pytest.approx(left.mean())
    expected = {"kivi2": {"2": 1.0}, "streaming": {"0": 1.0}, "int8-sink": {"8": 1.0}}
    if name in expected:
        assert shares == expected[name]
    else:
        assert set(shares) <= {"2", "4", "8", "16"} and len(shares) > 1


def test_fp16_policy_is_the_plain_cache_bit_for_bit():
    tokens, positions = ragged_batch(T=12, short=12)
    a = forward(PARAMS, CFG, tokens, positions, make_cache("fp16", CFG, 2, 16))[0]
    b = forward(PARAMS, CFG, tokens, positions, DenseCache.init(CFG, 2, 16))[0]
    np.testing.assert_array_equal(a, b)


def test_tiers_are_allocated_at_their_bits():
    """A b-bit KIVI tier is b/16 of FP16 plus its scales and zeros (1/16 at G=32, 16-bit scales)."""
    cfg = get_preset("SmolLM2-135M")
    capacity = 4096 + 128
    dense = jax.eval_shape(lambda: DenseCache.init(cfg, 1, capacity, jnp.float16))
    fp16_bytes = dense.k.size * 2 * 2
    for bits, expected in [(2, 2 / 16 + 1 / 16), (4, 4 / 16 + 1 / 16)]:
        cache = jax.eval_shape(lambda: make_cache(f"kivi{bits}", cfg, 1, capacity, jnp.float16))
        (tier,) = cache.packed
        per_token_head = (2 * 64 * bits / 8  # key and value codes
                          + 2 * 64 * 2 / 32  # key scale + zero per channel, one pair per 32 tokens
                          + 2 * 2 * 2)  # value scale + zero for each of two groups of 32 channels
        tier_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tier) if x.ndim == 5)
        stage = tier.k_stage.size * 2
        assert tier_bytes - stage == cfg.num_layers * cfg.num_kv_heads * 4096 * per_token_head
        assert (tier_bytes - stage) / (fp16_bytes * 4096 / capacity) == pytest.approx(expected)


def test_full_tier_sends_token_to_nearest_tier_with_room():
    spec = PolicySpec("m", quant_widths=(2, 4, 8), budget_bits=3.0, window=8, group_size=4)
    caps = jnp.asarray([8, 4, 4, 4])  # tiers 2, 4, 8, 16
    counts = jnp.asarray([[0, 4, 0, 0], [0, 4, 4, 0], [8, 4, 4, 4], [0, 0, 4, 0]])
    preferred = jnp.asarray([4, 4, 16, 8])
    # 4 full -> 8 (as near as 2, ties to the wider); 4 and 8 full -> 2; 16 full -> 8 full... -> 4 full -> 2;
    # 8 full -> 16 (ties between 4 and 16 go to the wider)
    np.testing.assert_array_equal(resolve_widths(spec, preferred, counts, caps), [8, 2, 0, 16])


def test_mixed_budget_histogram_and_capacities():
    for budget in (2.0, 2.5, 3.0, 4.0, 5.0):
        spec = parse_policy(f"mixed@{budget}")
        hist = spec.histogram()
        assert sum(hist.values()) == pytest.approx(1.0)
        assert sum(w * f for w, f in hist.items()) == pytest.approx(budget)
        caps = spec.capacities(4096 + 132)
        assert sum(caps.values()) >= 4096 and all(c % spec.group_size == 0 for c in caps.values())


def test_band_demotes_whole_groups_and_fills_its_budget():
    """band@B: the 4-bit ring holds (B - 2) / 2 of a full cache's left tokens; older groups move
    to the 2-bit tier, a whole group at a time, and a full cache averages B bits."""
    spec = spec_of("band@2.5")
    caps = spec.capacities(44)  # 32 left tokens: 8 in the band, 24 at 2 bits
    assert caps == {2: 24, 4: 8}
    assert sum(w * c for w, c in caps.items()) / sum(caps.values()) == pytest.approx(2.5)
    tokens, positions = ragged_batch()
    _, cache, _ = decode_all(spec, tokens, positions, 44)
    tiers = {k: np.asarray(v) for k, v in cache.tokens_per_tier().items()}
    left = np.asarray(positions >= 0).sum(1) - spec.sinks - spec.window  # 29 and 21
    np.testing.assert_array_equal(tiers["2-bit"], [24, 16])  # a group is demoted when one starts, 8 later
    np.testing.assert_array_equal(tiers["4-bit"], left - tiers["2-bit"])
    assert (tiers["4-bit"] <= caps[4]).all()


@pytest.mark.parametrize("make, message", [
    (lambda: PolicySpec("x", quant_widths=(3,)), "width 3"),
    (lambda: parse_policy("kivi2", window=100), "not a multiple of G"),
    (lambda: parse_policy("mixed@1.5"), "below 2 bits"),
    (lambda: parse_policy("mixed@abc"), "not a number"),
    (lambda: parse_policy("kivi2@3"), "only mixed"),
    (lambda: parse_policy("band@4.5"), "above 4.00"),
    (lambda: parse_policy("band@3", precision="rule"), "takes no precision"),
    (lambda: make_cache(spec_of("band@3"), CFG, 1, 64).replace(kernels="kernel").kernel_mode(), "reference path only"),
    (lambda: parse_policy("kivi3"), "unknown KV-cache policy"),
    (lambda: make_cache(parse_policy("kivi2", group_size=12, window=120), CFG, 1, 64), "does not divide head_dim"),
    (lambda: make_cache(parse_policy("streaming", window=600), CFG, 1, 64), "exceeds the model's context"),
    (lambda: forward(PARAMS, CFG, jnp.zeros((1, 2), jnp.int32), jnp.arange(2)[None],
                     make_cache(spec_of("kivi2"), CFG, 1, 64)), "one token per sequence"),
])
def test_invalid_configurations_raise_clear_errors(make, message):
    with pytest.raises(KvjaxError, match=message):
        make()


def test_generate_reports_tiers(tiny_checkpoint):
    from kvjax.generation import generate
    from kvjax.loading import load_model

    model = load_model(tiny_checkpoint.hf_folder)
    model.cfg = model.cfg.replace(eos_token_id=None)
    result = generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=30, kv=spec_of("mixed-rule@3"))
    assert sum(result.kv_tiers.values()) == 5 + 30 - 1
    assert result.kv_tiers["window"] == WINDOW and "2-bit" in result.stats_line()
    assert isinstance(make_cache(spec_of("kivi2"), CFG, 1, 64), TieredCache)


def test_plain_mixed_uses_the_shipped_controller():
    spec = parse_policy("mixed")
    assert spec.precision == "learned" and spec.budget_bits == 3.0 and spec.controller is not None
    assert spec.controller.model["vocab_size"] == get_preset("SmolLM2-135M").vocab_size
    assert sum(spec.histogram().values()) == pytest.approx(1.0)
    assert sum(w * f for w, f in spec.histogram().items()) <= 3.0 + 1e-6
    assert parse_policy("mixed-learned@2.5").controller.budget_bits == 2.5
    with pytest.raises(KvjaxError, match="no shipped controller for 2.7 bits"):
        parse_policy("mixed-learned@2.7")
    assert parse_policy("mixed@3").precision == "static"  # a budget in the name keeps the static default
