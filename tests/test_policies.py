"""Cache policies: teacher-forced scoring equals step-by-step decoding, for every registered policy.

The proofs run over `kvjax.policies.REGISTRY` (each family's examples) and over TEST_POLICIES,
which exercise what no registered policy uses yet: widths that differ by layer and between keys
and values, 16-bit keys inside a tier, a chain of three bands, rotated keys and values. One more is
registered below the way a user adds a policy (a `Bands` with a rule and a `register` call, public names only), so the
proofs cover it because it is in the registry.

They decode through `replay.Replay`, which stores the teacher-forced path's K/V and features in
the step-by-step cache, so that both paths quantize bit-identical inputs whatever the CPU's
summation order (see tests/replay.py); the drift it records bounds how far the model's own K/V
and features differ between the paths.
"""

import dataclasses

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
from kvjax.generation import prefill
from kvjax.history import History
from kvjax.kernels import Kernels, resolve
from kvjax.model import forward, init_params
from kvjax.layout import EVICTED, NO_ENTRY, WIDTHS, Layout, Tier
from kvjax.allocation import Allocation
from kvjax.policies import REGISTRY, Bands, Family, Mixed, get_policy, make_cache, register
from kvjax.stores import ByWidth
from kvjax.tiered import TieredCache
from replay import Replay

CFG = get_preset("tiny")  # 2 layers, head_dim 16
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
# Small window and groups so that short sequences cross many window and group boundaries.
WINDOW, GROUP = 8, 4
TEST_POLICIES = {
    # keys and values at different widths, the first layer wider, a 4 -> 2 demotion that copies the
    # second layer's 2-bit values and re-encodes everything else
    "test-per-layer": Bands("test-per-layer", bands=(((8, 4), (4, 2)), ((4, 2), 2)), shares=(0.5,), sinks=2,
                            window=WINDOW, group_size=GROUP),
    # 16-bit keys in the first band of the first layer, then re-encoded at 2 bits
    "test-dense-keys": Bands("test-dense-keys", bands=(((16, 4), 4), (2, 2)), shares=(0.5,), sinks=4,
                             window=WINDOW, group_size=GROUP),
    # a chain of three tiers: two rings, then the rest
    "test-three-bands": Bands("test-three-bands", bands=((8, 8), (4, 4), (2, 2)), shares=(0.25, 0.25), sinks=4,
                              window=WINDOW, group_size=GROUP),
    # two rings of one group each: a token enters, is quantized and moves on twice within a prompt chunk
    "test-one-group-rings": Bands("test-one-group-rings", bands=((8, 8), (4, 4), (2, 2)), shares=(0.01, 0.01),
                                  sinks=3, window=WINDOW, group_size=GROUP),
    # Hadamard-rotated keys and values (kvjax.rotation) through a 4 -> 2 demotion; rotated values alone
    # in symmetric per-token codes with sinks
    "test-rotated-bands": Bands("test-rotated-bands", bands=(((4, 2), 4), (2, 2)), shares=(0.5,), sinks=2,
                                window=WINDOW, group_size=GROUP, rotate="both"),
    "test-rotated-values": Bands("test-rotated-values", bands=((4, 4),), symmetric=True, sinks=2, window=WINDOW,
                                 group_size=GROUP, rotate="values"),
}
# An allocation for the tiny model at 2.5 bits: three age bands, 16-bit keys demoted to 2, keys and
# values apart, per layer.
TINY_ALLOCATION = Allocation(keys=((16, 2), (2, 2), (2, 2)), values=((4, 2), (2, 2), (2, 2)), shares=(0.125, 0.375),
                             sinks=2, window=WINDOW, group_size=GROUP)


def keys_4_bit_in_the_first_half(depth):
    """A width rule of the layer's depth in [0, 1): 4 bits in the first half of the layers, 2 after."""
    return 4 if depth < 0.5 else 2


# A policy added as a user adds one: a Bands with a rule and one register call. Being in the
# registry is all it takes for every proof below to run it.
register(Family("test-k4-first-half",
                lambda name, budget, o: Bands(name, bands=((keys_4_bit_in_the_first_half, 2),), **o),
                "KIVI with keys at 4 bits in the first half of the layers, 2 bits after, and values at 2 bits"))

NAMES = [name for family in REGISTRY.values() for name in (family.examples or (family.name,))] + list(TEST_POLICIES)
# Largest difference between the model's own K/V (and features) and the reference ones that the proofs
# accept: one ulp of the 16-bit storage (2^-10 relative) plus float32 rounding, far below a quantization step.
DRIFT = 2e-3


def tiny_controller(budget=3.0, seed=1):
    """A small random controller for the tiny model (its widths vary from token to token)."""
    params = ControllerMLP((8, 8)).init(jax.random.PRNGKey(seed), jnp.zeros((1, len(INPUTS))))["params"]
    counts = np.random.default_rng(seed).integers(0, 50, CFG.vocab_size)
    return Controller(params=jax.tree_util.tree_map(np.asarray, params), hidden=(8, 8),
                      mean=np.asarray([5.0, 0.05, 5.5, 3.9, 3.9, 0.5], np.float32),
                      std=np.asarray([0.05, 0.01, 0.2, 0.1, 0.2, 0.3], np.float32),
                      counts=counts, budget_bits=budget, histogram={2: 0.7, 4: 0.2, 8: 0.05, 16: 0.05},
                      bias=0.0, model=model_signature(CFG))


def policy_of(name):
    """`name` for the tiny model: W=8, G=4; a small random controller for learned / random policies."""
    if name in TEST_POLICIES:
        return TEST_POLICIES[name]
    if name == "fp16":
        return get_policy(name)
    family = REGISTRY[name.split("@")[0]]
    controller = tiny_controller(float(name.split("@")[1])) if family.takes_controller else None
    allocation = TINY_ALLOCATION if family.takes_allocation else None
    return get_policy(name, window=WINDOW, group_size=GROUP, controller=controller, allocation=allocation)


def reference(policy, tokens, positions, capacity):
    """Teacher-forced logits [b, T, v], the scoring cache (K/V, tiers) and features of `tokens`."""
    return teacher_forced.score_with_features(PARAMS, CFG, tokens, positions, policy, capacity)


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


def decode_all(policy, tokens, positions, capacity, kernels=Kernels.AUTO):
    """Step-by-step decoding from an empty cache that replays the teacher-forced K/V and features:
    logits [b, T, v], the final cache (unwrapped), and the teacher-forced logits."""
    want, tf, features = reference(policy, tokens, positions, capacity)
    empty = make_cache(policy, CFG, tokens.shape[0], capacity, kernels=kernels)
    got, cache = decode_steps(Replay.around(empty, tf, features), tokens, positions)
    assert float(cache.drift.max()) < DRIFT, cache.drift
    return got, cache.inner, want


def ragged_batch(T=41, short=33, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, T)))
    positions = np.tile(np.arange(T), (2, 1))
    positions[1, short:] = -1
    return tokens, jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_forced_equals_step_by_step_decode(name):
    policy = policy_of(name)
    tokens, positions = ragged_batch()
    capacity = 44
    got, cache, want = decode_all(policy, tokens, positions, capacity)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-5)
    if policy.layout(CFG, capacity) is not None:  # quantized: not equal to the full-precision forward
        full, _ = forward(PARAMS, CFG, tokens, positions)
        assert float(jnp.abs(full - got)[valid].max()) > 1e-3
    # every stored token is in exactly one tier, and nothing is dropped unless the policy says it
    # evicts; then the sinks and the window still are not
    stored = sum(np.asarray(v) for v in cache.tokens_per_tier().values())
    lengths = valid.sum(1)
    if policy.evicts:
        assert (stored <= lengths).all() and (stored >= np.minimum(lengths, policy.sinks + policy.window)).all()
    else:
        np.testing.assert_array_equal(stored, lengths)


# A chunk longer than W sees its own first tokens leave the window and move down the tiers: one policy
# of each kind of store and route (dense, symmetric with sinks, evicting, rings, per-layer widths, a ring
# a token passes within a chunk, rotated, and one that reads features, whose chunks stay at W).
LONG_CHUNK_NAMES = ["fp16", "kivi2", "int8-sink", "streaming", "band@3", "learned-alloc@2.5", "test-one-group-rings",
                    "test-three-bands", "test-rotated-bands", "mixed-learned@3"]
WHOLE_PROMPT_NAMES = ["fp16", "int8-sink", "band@3", "learned-alloc@2.5", "test-one-group-rings"]  # one chunk of 49


@pytest.mark.parametrize("name, chunk", [(n, c) for c in (3, 7) for n in NAMES] + [(n, 20) for n in LONG_CHUNK_NAMES]
                         + [(n, 49) for n in WHOLE_PROMPT_NAMES])
def test_chunked_prefill_then_decode_equals_teacher_forced(name, chunk):
    """Prompts of P tokens (and a shorter one, right-padded) prefilled `chunk` tokens at a time, then
    decoded step by step, equal teacher forcing of the whole: chunks of 3 and 7 split the window
    (W = 8), the key groups (G = 4) and the sinks; in a chunk of 20, or the whole prompt of 49, tokens
    of the chunk leave the window within it (a policy that reads features takes chunks of W). The prefill is
    kvjax.generation.prefill itself; every step replays the reference K/V (tests/replay.py), so both
    paths quantize identical floats."""
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=62, short=41, seed=1)
    capacity, P = 64, 49
    want, tf, features = reference(policy, tokens, positions, capacity)
    cache = Replay.around(make_cache(policy, CFG, 2, capacity), tf, features)
    last, cache = prefill(PARAMS, tokens[:, :P], positions[:, :P], cache, cfg=CFG, dtype=jnp.float32, chunk=chunk)
    ends = jnp.asarray([P, 41]) - 1
    np.testing.assert_allclose(last, want[jnp.arange(2), ends], atol=2e-5, rtol=1e-5)
    got, cache = decode_steps(cache, tokens, positions, start=P)
    assert float(cache.drift.max()) < DRIFT, cache.drift
    valid = np.asarray(positions[:, P:]) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want[:, P:])[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [7, 20, 51])
@pytest.mark.parametrize("name", ["kivi2", "band@3", "mixed-rule@3", "test-one-group-rings", "fp16"])
def test_chunked_prefill_leaves_the_state_decoding_leaves(name, chunk):
    """After a prompt, the chunked prefill's cache holds every array as step-by-step decoding of the
    prompt leaves it: the same codes, scales, zeros, stages and counters, bit for bit (both store the
    same replayed K/V), and so does `filled` (the benchmarks' state after given K/V); what no step
    reads may differ (`_unread_zeroed`)."""
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=51, short=37, seed=5)
    _, tf, features = reference(policy, tokens, positions, 52)
    empty = lambda: Replay.around(make_cache(policy, CFG, 2, 52), tf, features)
    _, stepped = decode_steps(empty(), tokens, positions)
    _, chunked = prefill(PARAMS, tokens, positions, empty(), cfg=CFG, dtype=jnp.float32, chunk=chunk)
    filled = make_cache(policy, CFG, 2, 52).filled(tf.k, tf.v, positions, features)
    stepped, chunked, filled = (_unread_zeroed(c) for c in (stepped.inner, chunked.inner, filled))
    for a, b, c in zip(*(jax.tree_util.tree_leaves(x) for x in (stepped, chunked, filled))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def _unread_zeroed(cache):
    """The cache with what no step reads zeroed: every tier's slots that hold no token (a ring's
    slots whose group moved on), and in a tier leaving tokens enter, the KIVI key codes, scales and
    zeros of the group being filled (its keys are read from the stage until it is complete) and
    the stage past its keys."""
    if not isinstance(cache, TieredCache):
        return cache
    tiers, lay = list(cache.tiers), cache.layout
    for i, t in enumerate(lay.tiers):
        entered = cache.entered[:, i]
        held = lay.valid_slots(i, entered)  # [b, c]
        start = lay.stage_start(i, entered)[:, None]
        slot = jnp.arange(t.slots)[None, :]
        filling = (slot >= start) & (slot < start + GROUP) & (i in lay.heads)
        staged = jnp.arange(GROUP)[None, :] < (entered % GROUP)[:, None]
        per_slot = lambda keep, x: jnp.where(keep[None, :, None, :, None], x, 0)
        per_group = lambda keep, x: per_slot(keep.reshape(keep.shape[0], -1, GROUP).any(-1), x)

        def zeroed(store, keys):
            if isinstance(store, ByWidth):  # a store per width, each laid out alike
                return store.replace(stores=tuple(zeroed(s, keys) for s in store.stores))
            out = {f: per_slot(held & ~(filling & keys), getattr(store, f)) for f in store.SLOTS}
            out.update({f: per_group(held & ~filling, getattr(store, f)) for f in store.GROUPS})
            if keys and store.staged:
                out["stage"] = per_slot(staged, store.stage)
            return store.replace(**out)

        tiers[i] = tiers[i].replace(keys=tuple(zeroed(k, True) for k in tiers[i].keys),
                                    values=tuple(zeroed(v, False) for v in tiers[i].values))
    return cache.replace(tiers=tuple(tiers), route=None)


@struct.dataclass
class _NudgedKV(Replay):
    """Replay, with the step's own K/V moved one ulp up before they reach it."""

    def attend(self, layer, q, k, v, positions):
        up = lambda x: jnp.nextafter(x, jnp.full_like(x, jnp.inf))
        return super().attend(layer, q, up(k), up(v), positions)


def test_an_ulp_in_the_decoded_kv_changes_nothing():
    """The proofs hold whatever the last bit of the K/V the model computes step by step: int8-sink,
    whose prefill once failed on an Intel Xeon from one flipped code, decodes bit-identically."""
    policy = policy_of("int8-sink")
    tokens, positions = ragged_batch(T=20, short=20, seed=1)
    _, tf, features = reference(policy, tokens, positions, 24)
    runs = [decode_steps(wrap.around(make_cache(policy, CFG, 2, 24), tf, features), tokens, positions)[0]
            for wrap in (Replay, _NudgedKV)]
    np.testing.assert_array_equal(*runs)


@pytest.mark.parametrize("name", ["kivi2", "kivi4", "int8-sink", "mixed-static@3", "band@3", "test-per-layer"])
def test_pallas_kernels_decode_equals_reference(name):
    """Decoding through the Pallas kernels (quantize + pack, fused attention; interpreted on CPU)
    equals the jnp/XLA reference path."""
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=27, short=22, seed=3)
    fused = Kernels.INTERPRET if jax.default_backend() == "cpu" else Kernels.PALLAS
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        want, _, _ = decode_all(policy, tokens, positions, 30, kernels=Kernels.REFERENCE)
        got, _, _ = decode_all(policy, tokens, positions, 30, kernels=fused)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["fp16", "kivi2", "int8-sink", "band@3", "test-per-layer", "test-three-bands",
                                  "test-dense-keys", "learned-alloc@2.5"])
def test_native_cpu_kernel_decode_equals_reference(name):
    """Decoding with packed tiers attended by the C++ CPU kernel (the CPU default) equals the jnp/XLA
    reference path; with the proofs above, which run the default, both equal teacher forcing."""
    if jax.default_backend() != "cpu" or resolve(Kernels.AUTO).kernels is not Kernels.NATIVE:
        pytest.skip("the native kernel is the default only on a CPU where it compiles")
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=27, short=22, seed=3)
    want, _, _ = decode_all(policy, tokens, positions, 30, kernels=Kernels.REFERENCE)
    got, _, _ = decode_all(policy, tokens, positions, 30, kernels=Kernels.NATIVE)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["fp16", "kivi2", "int8-sink", "band@3", "test-three-bands", "test-one-group-rings",
                                  "learned-alloc@2.5"])
def test_native_chunk_kernel_prefill_equals_reference(name):
    """Chunked prefill whose chunks attend through the C++ chunk kernel (NATIVE) equals the one through
    XLA (REFERENCE): the last tokens' logits to float32 rounding, and the cache bit for bit (both store
    the replayed K/V; a chunk's attention decides nothing that is stored)."""
    if jax.default_backend() != "cpu" or resolve(Kernels.AUTO).kernels is not Kernels.NATIVE:
        pytest.skip("the native kernel is the default only on a CPU where it compiles")
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=51, short=37, seed=5)
    _, tf, features = reference(policy, tokens, positions, 52)
    (want, cache_want), (got, cache_got) = (
        prefill(PARAMS, tokens, positions, Replay.around(make_cache(policy, CFG, 2, 52, kernels=k), tf, features),
                cfg=CFG, dtype=jnp.float32, chunk=7) for k in (Kernels.REFERENCE, Kernels.NATIVE))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    for a, b in zip(*(jax.tree_util.tree_leaves(c.inner) for c in (cache_want, cache_got))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["kivi2", "int4-sink", "mixed-static@3", "test-per-layer"])
def test_prefill_with_pallas_kernels_is_bit_identical(name):
    """Prompt prefill writes the same codes, scales and zeros through the quantize + pack kernels."""
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=29, short=25, seed=4)
    caches = [prefill(PARAMS, tokens, positions, make_cache(policy, CFG, 2, 32, kernels=k), cfg=CFG,
                      dtype=jnp.float32)[1] for k in (Kernels.REFERENCE, Kernels.INTERPRET)]
    assert int(jnp.sum(caches[0].entered)) > 0  # tokens did reach the quantized tiers
    for a, b in zip(*(jax.tree_util.tree_leaves(c) for c in caches)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["kivi2", "streaming", "int8-sink", "mixed-static@3", "test-per-layer", "fp16"])
def test_perplexity_summarizes_the_widths_of_left_tokens(name):
    """eval.perplexity's width record: the tokens older than the window at the last query, sinks
    excluded, at the bits the policy stored them at (0 = evicted)."""
    from eval.perplexity import segment_nll, width_summary

    policy = policy_of(name)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 40)
    nll, left = segment_nll(PARAMS, CFG, tokens, policy)
    bits, shares = width_summary(left)
    assert nll.shape == (39,) and np.isfinite(nll).all()
    if name == "fp16":
        assert left.size == 0 and (bits, shares) == (16.0, {"16": 1.0})
        return
    assert len(left) == 40 - WINDOW - policy.sinks  # positions sinks..31 are 8+ older than position 39
    assert abs(sum(shares.values()) - 1) < 1e-9 and bits == pytest.approx(left.mean())
    expected = {"kivi2": {"2": 1.0}, "streaming": {"0": 1.0}, "int8-sink": {"8": 1.0}}
    if name in expected:
        assert shares == expected[name]
    else:
        assert len(shares) > 1


@pytest.mark.parametrize("name", [n for n in NAMES if n != "fp16"])
def test_average_bits_are_what_a_full_cache_stores(name):
    """`average_bits` (what `python -m eval` reports) is read from the layout: for a policy whose left
    tokens pass through one chain of tiers it is the mean width of the left tokens of a full cache,
    as the exact scorer stores them at the last query (evicted: 0 bits)."""
    from eval.perplexity import segment_nll

    policy = policy_of(name)
    capacity = policy.sinks + policy.window + 8 * policy.group_size  # 8 whole groups leave the window
    full = CFG.replace(max_position_embeddings=capacity)  # average_bits: of a cache full at the model's context
    if len(policy.layout(full, capacity).heads) > 1:
        assert policy.average_bits(full) == policy.budget_bits  # mixed: tiers sized from the budget's histogram
        return
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, capacity)
    _, left = segment_nll(PARAMS, CFG, tokens, policy)
    assert len(left) == 8 * policy.group_size
    assert policy.average_bits(full) == pytest.approx(float(left.mean()), abs=1e-6)


def test_a_width_rule_fits_every_model():
    policy = policy_of("test-k4-first-half")
    assert policy.layout(CFG, 64).tiers[0].key_bits == (4, 2)
    smol = get_preset("SmolLM2-135M")
    assert get_policy("test-k4-first-half").layout(smol, 4096).tiers[0].key_bits == (4,) * 15 + (2,) * 15
    assert get_policy("test-k4-first-half").average_bits(smol) == 2.5


@pytest.mark.parametrize("kernels", [Kernels.REFERENCE, Kernels.AUTO])
def test_fp16_policy_is_the_plain_cache_bit_for_bit(kernels):
    """Same backend, same numbers (backends differ by float32 rounding: test_native_* below)."""
    tokens, positions = ragged_batch(T=12, short=12)
    a = forward(PARAMS, CFG, tokens, positions, make_cache("fp16", CFG, 2, 16, kernels=kernels))[0]
    b = forward(PARAMS, CFG, tokens, positions, DenseCache.init(CFG, 2, 16, kernels=kernels))[0]
    np.testing.assert_array_equal(a, b)


def test_tiers_are_allocated_at_their_bits():
    """A b-bit KIVI tier is b/16 of FP16 plus its scales and zeros (1/16 at G=32, 16-bit scales)."""
    cfg = get_preset("SmolLM2-135M")
    capacity = 4096 + 128
    dense = jax.eval_shape(lambda: DenseCache.init(cfg, 1, capacity, jnp.float16))
    fp16_bytes = dense.k.size * 2 * 2
    for bits, expected in [(2, 2 / 16 + 1 / 16), (4, 4 / 16 + 1 / 16)]:
        cache = jax.eval_shape(lambda: make_cache(f"kivi{bits}", cfg, 1, capacity, jnp.float16))
        (tier,) = cache.tiers
        keys, values = tier.keys[0], tier.values[0]
        per_token_head = (2 * 64 * bits / 8  # key and value codes
                          + 2 * 64 * 2 / 32  # key scale + zero per channel, one pair per 32 tokens
                          + 2 * 2 * 2)  # value scale + zero for each of two groups of 32 channels
        tier_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((keys, values)))
        stage = keys.stage.size * 2
        assert tier_bytes - stage == cfg.num_layers * cfg.num_kv_heads * 4096 * per_token_head
        assert (tier_bytes - stage) / (fp16_bytes * 4096 / capacity) == pytest.approx(expected)


def test_only_tiers_that_tokens_enter_keep_a_key_stage():
    """A tier reached only by demotion receives whole groups: it allocates no 16-bit stage."""
    cfg = get_preset("SmolLM2-135M")
    cache = jax.eval_shape(lambda: make_cache("band@3", cfg, 1, 4096, jnp.float16))
    entry, demoted = cache.tiers
    assert entry.keys[0].stage.shape[-2] == 32 and demoted.keys[0].stage.shape[-2] == 0


def test_a_short_run_allocates_no_more_than_fp16():
    """Capacity below S + W: nothing can leave the window, so no tier is allocated and the window is
    only as long as what can reach it."""
    cfg = get_preset("SmolLM2-135M")
    fp16 = make_cache("fp16", cfg, 1, 25, jnp.float16).nbytes
    for name in ("kivi2", "int8-sink", "mixed-static@3", "band@3", "streaming"):
        cache = make_cache(name, cfg, 1, 25, jnp.float16)
        assert all(t.slots == 0 for t in cache.layout.tiers)
        assert cache.nbytes <= fp16 + 64, name  # + the per-tier counters


@pytest.mark.parametrize("name", ["band@3", "test-three-bands", "test-one-group-rings", "learned-alloc@2.5",
                                  "mixed-static@3", "streaming"])
def test_demotion_schedule_online_equals_closed_form(name):
    """Decoding moves each group down its chain online (TieredCache.route_step, one step at a time);
    kvjax.history.History says in closed form at which step each token reaches each depth. At every
    step the tokens each tier has received are the same count both ways."""
    policy, T = policy_of(name), 90
    cache = make_cache(policy, CFG, 1, T)
    lay, entered = cache.layout, cache.entered
    online, tier, rank = [], np.full((1, T), NO_ENTRY), np.zeros((1, T), np.int32)
    for p in range(T):
        route, entered = cache.route_step(jnp.asarray([p]), entered)
        online.append(np.asarray(entered[0]))
        if route.leaving[0]:  # the token p - W left the window at this step
            tier[0, p - lay.window], rank[0, p - lay.window] = int(route.tier[0]), int(route.rank[0])
    hist = History.of(lay, jnp.asarray(tier), jnp.asarray(rank))
    depth_of = {i: (h, d) for h in lay.heads for d, i in enumerate(lay.chain(h))}
    for step in range(T):
        closed = [int(jnp.sum((hist.tier == depth_of[i][0]) & (hist.reach[:, depth_of[i][1]] <= step)))
                  for i in range(len(lay.tiers))]
        assert closed == online[step].tolist(), step
    assert any(n > 0 for n in online[-1][1:]) or len(lay.tiers) < 2 or name.startswith("mixed")  # groups did move


@pytest.mark.parametrize("name", ["band@3", "test-three-bands", "mixed-static@3"])
def test_a_run_too_short_to_fill_a_tier_decodes(name):
    """Tiers sized to what can reach them may hold no slot (here the demoted-to tiers): decoding
    must not move groups into or out of them, and still equals teacher forcing."""
    policy = policy_of(name)
    tokens, positions = ragged_batch(T=14, short=11)
    capacity = 15  # S + W + one group at most: nothing reaches a second tier
    assert any(t.slots == 0 for t in policy.layout(CFG, capacity).tiers)
    got, _, want = decode_all(policy, tokens, positions, capacity)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class _Prefers(Mixed):
    """A mixed policy whose every token prefers `width`."""

    width: int = 2

    def preferred(self, positions, features):
        return jnp.full(positions.shape, self.width, jnp.int32)


def test_full_tier_sends_token_to_nearest_tier_with_room():
    caps = (8, 4, 4, 4)  # tiers 2, 4, 8, 16 bits
    layout = Layout(4, 8, 4, tuple(Tier(f"{w}-bit", c, (w, w), (w, w)) for w, c in zip(WIDTHS, caps)), 2, 4, 8)
    entered = jnp.asarray([[0, 4, 0, 0], [0, 4, 4, 0], [8, 4, 4, 4], [0, 0, 4, 0]])
    got = [int(_Prefers("m", width=w).entry(jnp.zeros((1,), jnp.int32), None, row[None], layout)[0])
           for w, row in zip((4, 4, 16, 8), entered)]
    # 4 full -> 8 (as near as 2, ties to the wider); 4 and 8 full -> 2; everything full -> evicted;
    # 8 full -> 16 (ties between 4 and 16 go to the wider)
    assert got == [WIDTHS.index(8), WIDTHS.index(2), EVICTED, WIDTHS.index(16)]


def test_mixed_budget_histogram_and_capacities():
    for budget in (2.0, 2.5, 3.0, 4.0, 5.0):
        policy = get_policy(f"mixed-static@{budget}")
        hist = policy.histogram()
        assert sum(hist.values()) == pytest.approx(1.0)
        assert sum(w * f for w, f in hist.items()) == pytest.approx(budget)
        caps = policy.layout(get_preset("SmolLM2-135M"), 4096 + 132).caps
        assert sum(caps) >= 4096 and all(c % policy.group_size == 0 for c in caps)


def test_band_demotes_whole_groups_and_fills_its_budget():
    """band@B: the 4-bit ring holds (B - 2) / 2 of a full cache's left tokens; older groups move
    to the 2-bit tier, a whole group at a time, and a full cache averages B bits."""
    policy = policy_of("band@2.5")
    caps = policy.layout(CFG, 44).caps  # 32 left tokens: 8 in the band, 24 at 2 bits
    assert caps == (8, 24)
    assert (4 * caps[0] + 2 * caps[1]) / sum(caps) == pytest.approx(2.5)
    tokens, positions = ragged_batch()
    _, cache, _ = decode_all(policy, tokens, positions, 44)
    tiers = {k: np.asarray(v) for k, v in cache.tokens_per_tier().items()}
    left = np.asarray(positions >= 0).sum(1) - policy.sinks - policy.window  # 29 and 21
    np.testing.assert_array_equal(tiers["2-bit"], [24, 16])  # a group is demoted when one starts, 8 later
    np.testing.assert_array_equal(tiers["4-bit"], left - tiers["2-bit"])
    assert (tiers["4-bit"] <= caps[0]).all()


@pytest.mark.parametrize("make, message", [
    (lambda: Bands("x", bands=((3, 3),)).layout(CFG, 200), "width 3"),
    (lambda: get_policy("mixed@1.5"), "below 2 bits"),
    (lambda: get_policy("mixed@abc"), "not a number"),
    (lambda: get_policy("kivi2@3"), "kivi2 takes no bit budget; the policies that do: band@BITS, learned-alloc@BITS"),
    (lambda: get_policy("band@4.5"), "2 < B <= 4"),
    (lambda: get_policy("band"), "needs a bit budget"),
    (lambda: get_policy("kivi3"), "unknown KV-cache policy"),
    (lambda: get_policy("kivi2", controller="x.npz"), "a controller applies"),
    (lambda: get_policy("kivi2+hadamard"), r"unknown suffix \+hadamard; known: \+rot, \+rotk, \+rotv"),
    (lambda: get_policy("fp16+rot"), "fp16 quantizes nothing to rotate"),
    (lambda: get_policy("streaming+rot"), "streaming\\+rot: it quantizes nothing to rotate"),
    (lambda: Bands("x", rotate="diagonal"), "unknown rotation 'diagonal'"),
    (lambda: make_cache(get_policy("kivi2+rotk", group_size=16), CFG.replace(head_dim=48), 1, 64),
     "power-of-two head dimension"),
    (lambda: make_cache(get_policy("kivi2", group_size=12, window=120), CFG, 1, 64), "does not divide head_dim"),
    (lambda: make_cache(get_policy("streaming", window=600), CFG, 1, 64), "exceeds the model's context"),
    (lambda: forward(PARAMS, CFG, jnp.zeros((1, WINDOW + 1), jnp.int32), jnp.arange(WINDOW + 1)[None],
                     make_cache(policy_of("mixed-learned@3"), CFG, 1, 64)), "reads token features takes at most W = 8"),
])
def test_invalid_configurations_raise_clear_errors(make, message):
    with pytest.raises(KvjaxError, match=message):
        make()


def test_generate_reports_tiers(tiny_checkpoint):
    from kvjax.generation import generate
    from kvjax.loading import load_model

    model = load_model(tiny_checkpoint.hf_folder)
    model.cfg = model.cfg.replace(eos_token_id=None)
    result = generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=30, kv=policy_of("mixed-rule@3"))
    assert sum(result.kv_tiers.values()) == 5 + 30 - 1
    assert result.kv_tiers["window"] == WINDOW and "2-bit" in result.stats_line()
    assert isinstance(make_cache(policy_of("kivi2"), CFG, 1, 64), TieredCache)


def test_a_rotated_name_is_the_policy_with_its_sides_rotated():
    for name, rotate in (("kivi2+rot", "both"), ("band@3+rotk", "keys"), ("mixed@3+rotv", "values"),
                         ("int8-sink+rot", "both")):  # learned-alloc@B+rot: tests/test_allocate.py
        policy = get_policy(name)
        bare = get_policy(name.partition("+")[0])
        assert policy == dataclasses.replace(bare, name=policy.name, rotate=rotate)
        cfg = get_preset("SmolLM2-135M")
        assert policy.layout(cfg, 64).rotation.name == rotate and bare.layout(cfg, 64).rotation.name == "none"
    assert get_policy("mixed@3+rotv").name == "mixed-static@3+rotv"


def test_names_say_what_they_do_and_old_names_still_work():
    assert get_policy("mixed") == get_policy("mixed-learned@3")
    assert get_policy("mixed@3") == get_policy("mixed-static@3")
    assert get_policy("mixed@3").name == "mixed-static@3" and get_policy("mixed-rule@2.5").name == "mixed-rule@2.5"


def test_plain_mixed_uses_the_shipped_controller():
    policy = get_policy("mixed")
    assert policy.precision == "learned" and policy.budget_bits == 3.0 and policy.controller is not None
    assert policy.controller.model["vocab_size"] == get_preset("SmolLM2-135M").vocab_size
    assert sum(policy.histogram().values()) == pytest.approx(1.0)
    assert sum(w * f for w, f in policy.histogram().items()) <= 3.0 + 1e-6
    assert get_policy("mixed-learned@2.5").controller.budget_bits == 2.5
    with pytest.raises(KvjaxError, match="no shipped controller for 2.7 bits"):
        get_policy("mixed-learned@2.7")
