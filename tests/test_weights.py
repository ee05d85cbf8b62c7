"""Block-quantized weights: the kernel against its reference, the reference against gguf's own
dequantization, and a model loaded with --weights native/q8_0 against the float32 one."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_llama
from conftest import CFG, write_gguf
from kvjax.errors import KvjaxError
from kvjax.loading import load_model
from kvjax.model import forward
from kvjax.weights import BlockMatrix, Weights, resolve
from pallas_kernels import block_matmul
from pallas_kernels.block_matmul import Kind

KINDS = {Kind.Q4_0: gguf.GGMLQuantizationType.Q4_0, Kind.Q4_1: gguf.GGMLQuantizationType.Q4_1,
         Kind.Q8_0: gguf.GGMLQuantizationType.Q8_0}


def _blocks(kind, shape, seed=0):
    """Random float rows [.., N, K], with scales from 1e-4 to 1e2 by row, in gguf's blocks of `kind`."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * np.logspace(-4, 2, shape[-2], dtype=np.float32)[:, None]
    w[..., 0, :5] = [0.0, -0.0, 1e-30, 65504.0, -3.0]  # zeros, a subnormal scale's row, float16's largest
    flat = w.reshape(-1, shape[-1])
    return gguf.quants.quantize(flat, KINDS[kind]).reshape(*shape[:-1], -1)


@pytest.mark.parametrize("kind", list(Kind))
def test_dequantize_is_ggufs_bit_for_bit(kind):
    blocks = _blocks(kind, (3, 40, 96))
    want = gguf.quants.dequantize(blocks.reshape(-1, blocks.shape[-1]), KINDS[kind]).reshape(3, 40, 96)
    got = np.asarray(block_matmul.dequantize(jnp.asarray(blocks), kind))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 26, 57, 150])  # 1: tiles of 8 weight rows, 2+: of 4; 144+: panels
def test_kernel_equals_reference(kind, rows, portable):
    blocks = jnp.asarray(_blocks(kind, (3, 37, 128), seed=rows))  # 37 rows: every tile leaves some over
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 128)), jnp.float32)
    for layer in (0, 2):
        got = block_matmul.matmul(x, blocks, kind, layer=layer, portable=portable)
        want = block_matmul.matmul_reference(x, blocks, kind, layer=layer)
        exact = np.asarray(x, np.float64) @ np.asarray(block_matmul.dequantize(blocks[layer], kind), np.float64).T
        scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(block_matmul.dequantize(blocks[layer], kind),
                                                                      np.float64)).T
        for y in (got, want):  # float32 sums in any order: within a few ulps of the sum of magnitudes
            assert np.all(np.abs(np.asarray(y) - exact) <= 1e-6 * scale + 1e-30)
    np.testing.assert_array_equal(block_matmul.matmul(x, blocks[1], kind, portable=portable),
                                  block_matmul.matmul(x, blocks, kind, layer=1, portable=portable))


def test_kernel_refuses_blocks_that_do_not_fit():
    blocks = jnp.asarray(_blocks(Kind.Q4_1, (8, 64)))
    with pytest.raises(ValueError, match="do not hold rows"):
        block_matmul.matmul(jnp.ones((1, 96)), blocks, Kind.Q4_1)
    with pytest.raises(ValueError, match="do not hold rows"):
        block_matmul.matmul(jnp.ones((1, 64)), blocks, Kind.Q8_0)


def test_unknown_weights_choice_is_a_clear_error():
    with pytest.raises(KvjaxError, match="unknown weights 'int3'"):
        resolve("int3")
    assert resolve("auto", platform="gpu") is Weights.FLOAT32


def _logits(model, n, seed=0):
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, n)
    logits, _ = forward(model.params, model.cfg, jnp.asarray(tokens)[None], jnp.arange(n)[None])
    return np.asarray(logits[0])


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q8_0"])
def block_gguf(request, tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    write_gguf(path, CFG, tiny_checkpoint.state_dict, gguf.GGMLQuantizationType[request.param])
    return str(path), Kind[request.param]


def test_native_weights_keep_the_files_blocks(block_gguf):
    path, kind = block_gguf
    native = load_model(path, weights="native")
    matrices = [native.params["embed"]["embedding"]] + [leaf["kernel"] for leaf in native.params["layers"].values()
                                                       if "kernel" in leaf]
    assert all(isinstance(m, BlockMatrix) and m.kind is kind for m in matrices)
    assert native.params["layers"]["q_proj"]["kernel"].blocks.shape == (
        CFG.num_layers, CFG.num_heads * CFG.head_dim, CFG.hidden_size // 32 * kind.block_bytes)


@pytest.mark.parametrize("n", [1, 53], ids=["decode rows", "panel rows"])
def test_native_weights_compute_the_float32_models_values(block_gguf, n):
    """The same values as float32 weights (dequantized at load): logits equal up to summation order."""
    path, _ = block_gguf
    native, float32 = load_model(path, weights="native"), load_model(path, weights="float32")
    is_block = lambda a: isinstance(a, BlockMatrix)
    assert not any(map(is_block, jax.tree_util.tree_leaves(float32.params, is_leaf=is_block)))
    got, want = _logits(native, n), _logits(float32, n)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_q8_0_weights_quantize_a_float_checkpoint(tiny_checkpoint):
    model = load_model(tiny_checkpoint.hf_folder, weights="q8_0")
    assert isinstance(model.params["layers"]["down_proj"]["kernel"], BlockMatrix)
    q8 = gguf.GGMLQuantizationType.Q8_0
    sd = {k: gguf.quants.dequantize(gguf.quants.quantize(v, q8), q8) if v.ndim == 2 else v
          for k, v in tiny_checkpoint.state_dict.items()}
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 16)
    logits, _ = forward(model.params, model.cfg, jnp.asarray(tokens)[None], jnp.arange(16)[None])
    np.testing.assert_allclose(np.asarray(logits[0]), numpy_llama.forward(sd, CFG, tokens), atol=2e-4, rtol=1e-4)
    assert not isinstance(load_model(tiny_checkpoint.hf_folder, weights="native").params["layers"]["down_proj"]
                          ["kernel"], BlockMatrix)  # native: a float checkpoint as stored


@pytest.mark.parametrize("matrices", [Kind.Q4_1, Kind.Q8_0])
def test_a_presets_blocks_hold_the_bytes_the_estimate_counts(matrices):
    from kvjax.model import init_params
    from kvjax.weights import as_blocks, as_blocks_bytes

    params = as_blocks(init_params(CFG, jax.random.PRNGKey(0)), matrices)
    assert params["layers"]["up_proj"]["kernel"].kind is matrices
    assert params["embed"]["embedding"].kind is Kind.Q8_0
    assert sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) == as_blocks_bytes(CFG, matrices)


def test_weight_bytes_from_the_header_are_what_loads(block_gguf):
    from kvjax.loading import weight_bytes

    path, _ = block_gguf
    for choice in (Weights.FLOAT32, Weights.NATIVE):
        for dtype in (jnp.float32, jnp.bfloat16):  # what is not in blocks is held in the compute dtype
            loaded = load_model(path, dtype, weights=choice)
            assert weight_bytes(path, choice, dtype) == sum(a.nbytes for a in jax.tree_util.tree_leaves(loaded.params))
