"""generate() on a small checkpoint, and the CLI's one-line errors."""

import jax
import jax.numpy as jnp
import pytest

from kvjax.generate import main
from kvjax import generation
from kvjax.generation import generate
from kvjax.loading import load_model
from kvjax.model import forward
from kvjax.policies import get_policy

TINY_KIVI2 = get_policy("kivi2", window=8, group_size=4)  # the tiny model's head_dim is 16


def _greedy_without_cache(model, prompt, n):
    """Greedy decoding by re-running the full forward (no cache) on a fixed padded length."""
    full = jax.jit(forward, static_argnums=1)
    width = len(prompt) + n
    ids = list(prompt)
    for _ in range(n):
        tokens = jnp.asarray([ids + [0] * (width - len(ids))])
        positions = jnp.asarray([list(range(len(ids))) + [-1] * (width - len(ids))])
        logits, _ = full(model.params, model.cfg, tokens, positions)
        ids.append(int(logits[0, len(ids) - 1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("chunk", [None, 3])
def test_batched_greedy_generation_equals_uncached_greedy(tiny_checkpoint, chunk):
    model = load_model(tiny_checkpoint.hf_folder)
    model.cfg = model.cfg.replace(eos_token_id=None)  # random weights: never stop early
    prompts = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2, 6], [42]]
    result = generate(model, prompts, max_new_tokens=7, chunk=chunk)
    for prompt, got in zip(prompts, result.tokens):
        assert got == _greedy_without_cache(model, prompt, 7)
    assert result.decode_steps == 6 and result.kv_bytes > 0


def test_a_request_shaped_like_a_recent_one_reuses_its_programs(tiny_checkpoint):
    """Same shapes and settings: the same compiled pair, and the same tokens; other prompts of those
    shapes reuse it too; another length compiles its own."""
    model = load_model(tiny_checkpoint.hf_folder)
    model.cfg = model.cfg.replace(eos_token_id=None)
    generation.forget_programs()
    first = generate(model, [[5, 17, 99], [3, 1, 4]], max_new_tokens=5, kv=TINY_KIVI2)
    assert generation.programs_kept() == 1
    again = generate(model, [[5, 17, 99], [3, 1, 4]], max_new_tokens=5, kv=TINY_KIVI2)
    other = generate(model, [[8, 8, 8], [2, 7, 1]], max_new_tokens=5, kv=TINY_KIVI2)
    assert generation.programs_kept() == 1 and again.tokens == first.tokens
    assert other.tokens == [_greedy_without_cache(model, p, 5) for p in ([8, 8, 8], [2, 7, 1])]
    generate(model, [[5, 17, 99, 1]], max_new_tokens=5, kv=TINY_KIVI2)
    assert generation.programs_kept() == 2


def test_generation_stops_at_eos(tiny_checkpoint):
    model = load_model(tiny_checkpoint.hf_folder)
    model.cfg = model.cfg.replace(eos_token_id=None)
    free = generate(model, [[7, 8, 9]], max_new_tokens=6).tokens[0]
    model.cfg = model.cfg.replace(eos_token_id=free[2])
    stopped = generate(model, [[7, 8, 9]], max_new_tokens=6).tokens[0]
    assert stopped == free[:free.index(free[2])]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "hi", "--top-p", "2"], "top-p"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "hi", "--kv", "int3"], "unknown KV-cache policy"),
    (["--prompt", "hi", "--kv", "mixed@1"], "below 2 bits"),
    (["--prompt", "hi", "--kv", "kivi2@3"], "kivi2 takes no bit budget"),
    (["--prompt", "hi", "--dtype", "float8"], "--dtype"),
    (["--prompt", "hi", "--max-new-tokens", "ten"], "--max-new-tokens"),
    (["--max-new-tokens", "3"], "--prompt"),
])
def test_cli_invalid_flags_are_one_line_errors(tiny_checkpoint, capsys, argv, message):
    code, err = _run(capsys, "--model", tiny_checkpoint.gguf_f32, *argv)
    assert code == 2 and err.startswith("error:") and message in err and "\n" not in err


def test_cli_prompt_longer_than_context(tiny_checkpoint, capsys):
    """Known only once the prompt is tokenized: the error follows the loading line."""
    code, err = _run(capsys, "--model", tiny_checkpoint.gguf_f32, "--prompt", "x" * 600)
    *progress, last = err.splitlines()
    assert code == 2 and "exceeds the model's context of 512 tokens" in last and last.startswith("error:")
    assert all(line.startswith("[kvjax]") for line in progress)


def test_cli_bad_model_files(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(open(tiny_checkpoint.gguf_f32, "rb").read()[:5000])
    for model, message in [(str(broken), "broken.gguf"), (str(tmp_path / "none.gguf"), "not found")]:
        code, err = _run(capsys, "--model", model, "--prompt", "hi")
        assert code == 2 and message in err and "\n" not in err


def test_cli_streams_text_and_stats(tiny_checkpoint, capsys):
    code = main(["--model", tiny_checkpoint.gguf_f32, "--prompt", "abc", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("abc")
    assert "ms/token" in captured.err and "tokens/s" in captured.err and "KV cache" in captured.err
