"""TPU-ready, checked without a TPU: the Pallas TPU kernels lower for TPU from a CPU host.

Each kernel, the fused decode attention over a packed tier (KIVI and symmetric) and the three
quantize + pack encoders (values per token, keys per channel in groups, symmetric), is exported
with `jax.export.export(..., platforms=("tpu",))` at the shapes of SmolLM-135M, -360M and -1.7B
(G = 32, bits 2 and 4, batch 1 and 8, tiers of 1024 and 4096 slots), with `backend="tpu"` so the
kernels take their TPU code path and plan their blocks as on a TPU (`auto_blocks`, the PackBlocks
defaults). The export must hold Mosaic's `tpu_custom_call`.

What this proves: Pallas lowers every kernel to a Mosaic TPU module for these shapes and plans:
each block obeys Mosaic TPU's block rule (a block's last two dims are full array dims or
multiples of (8, 128)), each op in the kernels has a Mosaic lowering rule, and the scalar counts
go to SMEM. `test_a_rejected_block_shape_fails_to_lower` shows that a plan breaking the block
rule fails here, so these tests catch one. (The TPU interpreter does not apply the block rule:
decode attention's m / l blocks broke it for S > 1 splits and its interpreter tests passed.)

What this does not prove: nothing here compiles or runs on a TPU. Mosaic's own compile (layout
inference, e.g. whether the lane-splitting reshapes of packing and unpacking are supported, and
VMEM limits) happens in libtpu, which is not used; numerics are checked by the TPU-interpreter
tests in test_pallas_decode_attention.py and test_pallas_quantize_pack.py. The lowering asks for
TPU chip facts (jnp's integer floor division lowers through `sign`, whose Mosaic rule reads the
TPU generation), which a CPU host has not: an abstract TPU v5e device supplies them.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from kvjax.config import get_preset
from pallas_kernels import quantize_pack as qp
from pallas_kernels.decode_attention import auto_blocks, tier_attention_partials

MODELS = ("SmolLM-135M", "SmolLM-360M", "SmolLM-1.7B")
BATCHES = (1, 8)
SLOTS = (1024, 4096)
BITS = (2, 4)
G = 32
BF16 = jnp.bfloat16
S = jax.ShapeDtypeStruct
_TPU = jax.sharding.AbstractMesh((1,), ("tpu",), abstract_device=jax.sharding.AbstractDevice(
    device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


def lower_for_tpu(fn, *args) -> str:
    """The StableHLO text of fn exported for TPU from this host; asserts it holds a Mosaic kernel."""
    with jax.sharding.use_abstract_mesh(_TPU):
        exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    assert "stablehlo.custom_call @tpu_custom_call" in text, "no Mosaic kernel in the export"
    return text


def shapes(model: str):
    cfg = get_preset(model)
    return cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim  # k, g, h


@pytest.mark.parametrize("model,b,c,bits,kind",
                         list(itertools.product(MODELS, BATCHES, SLOTS, BITS, ("kivi", "sym"))))
def test_decode_attention_lowers_for_tpu(model, b, c, bits, kind):
    k, g, h = shapes(model)
    w = h * bits // 32
    q, codes, count = S((b, k * g, h), BF16), S((b, k, c, w), jnp.uint32), S((b,), jnp.int32)
    blocks = auto_blocks(b, k, c)
    if kind == "kivi":
        key_side, value_side = S((b, k, c // G, h), BF16), S((b, k, c, h // G), BF16)  # scale, zero
        fn = lambda q, kc, ks, kz, vc, vs, vz, n: tier_attention_partials(
            q, kc, ks, kz, vc, vs, vz, n, bits=bits, group_size=G, blocks=blocks, backend="tpu")
        lower_for_tpu(fn, q, codes, key_side, key_side, codes, value_side, value_side, count)
    else:
        scale = S((b, k, c, 1), BF16)
        fn = lambda q, kc, ks, vc, vs, n: tier_attention_partials(
            q, kc, ks, None, vc, vs, None, n, bits=bits, group_size=G, blocks=blocks, backend="tpu")
        lower_for_tpu(fn, q, codes, scale, codes, scale, count)


ENCODERS = {
    "values": lambda x, bits: qp.encode_values(x, bits, G, BF16, backend="tpu"),
    "keys": lambda x, bits: qp.encode_key_groups(x, bits, G, BF16, backend="tpu"),
    "sym": lambda x, bits: qp.encode_sym(x, bits, BF16, backend="tpu"),
}


@pytest.mark.parametrize("model,b,tokens,bits,kind",
                         list(itertools.product(MODELS, BATCHES, ("step", *SLOTS), BITS, ENCODERS)))
def test_quantize_pack_lowers_for_tpu(model, b, tokens, bits, kind):
    """As kvjax calls them: a decode step (one token per row; keys a whole group) or a tier's fill."""
    k, _, h = shapes(model)
    c = (G if kind == "keys" else 1) if tokens == "step" else tokens
    lower_for_tpu(lambda x: ENCODERS[kind](x, bits), S((b, k, c, h), BF16))


def test_a_rejected_block_shape_fails_to_lower(monkeypatch):
    """A bad plan fails here: key blocks planned as off TPU (BR = 64, scale blocks [BR / G, h] = [2, 64]
    of a [R / G, h] array: 2 is neither R / G nor a multiple of 8), which Mosaic TPU rejects."""
    x = S((1, 3, 2048, 64), BF16)  # shapes no other test lowers: jit caches traces by shape
    lower_for_tpu(lambda x: ENCODERS["keys"](x, 4), x)  # the TPU plan: BR = 8 * G
    plan = qp.plan_block_rows
    monkeypatch.setattr(qp, "plan_block_rows", lambda rows, unit, blocks, target: plan(rows, unit, blocks, "interpret"))
    x = S((1, 3, 2080, 64), BF16)
    with pytest.raises(ValueError, match="last two dimensions of your block shape are divisible by 8 and 128"):
        lower_for_tpu(lambda x: ENCODERS["keys"](x, 2), x)


# The whole model on 8 TPU devices: generate's sharded prefill and decode (kvjax.generation.programs,
# each device its rows: kvjax.sharding) at SmolLM2-135M's shapes, exported for TPU from this host.
_TPU_8 = jax.sharding.AbstractMesh((8,), ("data",), abstract_device=_TPU.abstract_device)


@pytest.mark.parametrize("name, backend", [("fp16", "reference"), ("kivi2", "reference"), ("kivi2", "pallas"),
                                           ("learned-alloc@2.5", "pallas")])
def test_the_sharded_model_lowers_for_eight_tpu_devices(name, backend):
    from kvjax import sharding
    from kvjax.generation import cache_specs, prefill, programs, start_state, state_specs
    from kvjax.kernels import Backend, Pallas
    from kvjax.model import init_params
    from kvjax.policies import get_policy
    from kvjax.sampling import SamplingConfig

    assert _TPU_8.axis_names == (sharding.DATA,)
    cfg, policy, kernels = get_preset("SmolLM2-135M"), get_policy(name), Backend()
    if backend == "pallas":
        kernels = Pallas(platform="tpu")  # the kernels' TPU path, lowered from this CPU host
    batch, prompt, new = 16, 512, 8
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), BF16))
    tokens = S((batch, prompt), jnp.int32)
    cache = jax.eval_shape(lambda: policy.make_cache(cfg, batch, prompt + new, BF16, kernels))
    specs = cache_specs(policy, cfg, prompt + new, BF16, kernels)
    prefill_fn, decode_fn = programs(cfg, BF16, SamplingConfig(), new, _TPU_8, specs)
    on = lambda tree, spec: sharding.shapes_on(tree, _TPU_8, spec)
    logits, filled = jax.eval_shape(lambda *a: prefill(*a, cfg=cfg, dtype=BF16), params, tokens, tokens, cache)
    state = jax.eval_shape(lambda l, c: start_state(l, c, jax.random.PRNGKey(0), new, SamplingConfig(), 0),
                           logits, filled)
    with jax.sharding.use_abstract_mesh(_TPU_8):
        exported = [jax.export.export(prefill_fn, platforms=("tpu",))(
                        on(params, sharding.REPLICATED), on(tokens, sharding.ROWS), on(tokens, sharding.ROWS),
                        on(cache, specs)),
                    jax.export.export(decode_fn, platforms=("tpu",))(
                        on(params, sharding.REPLICATED), on(state, state_specs(specs)), 0)]
    for e in exported:
        assert e.platforms == ("tpu",) and e.nr_devices == 8
    if backend == "pallas":  # the packed tiers' fused attention runs as a Mosaic kernel in decode
        assert "stablehlo.custom_call @tpu_custom_call" in exported[1].mlir_module()
