"""Every command: bad input is one `error:` line naming the problem, exit code 2, before any model loads;
every option has a description in --help; compiled programs are cached where the user expects."""

import jax
import pytest

import eval.__main__ as eval_main
import eval.harness as harness
import eval.longctx as longctx
import eval.perplexity as perplexity
import eval.report as report
import kvjax.bench as bench
import kvjax.generate as generate
import pallas_kernels.bench as kernel_bench
import train_controller.__main__ as train_main
import train_controller.allocate as allocate
from kvjax import cli

COMMANDS = {"generate": generate, "eval": eval_main, "perplexity": perplexity, "bench": bench,
            "train": train_main, "allocate": allocate, "report": report, "kernel-bench": kernel_bench,
            "longctx": longctx, "harness": harness}


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """A command that reaches the model with bad flags fails these tests loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    for module in (generate, eval_main, perplexity, bench, allocate, longctx):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr("kvjax.loading.load_model", refuse)


CASES = [
    ("generate", ["--prompt", "hi", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "8192"], "--max-new-tokens 8192 leaves no room"),
    ("generate", ["--prompt", "hi", "--chunk", "0"], "argument --chunk"),
    ("generate", ["--prompt", "hi", "--top-p", "0"], "argument --top-p: must be > 0"),
    ("generate", ["--prompt", "hi", "--top-p", "2"], "top-p must be in (0, 1]"),
    ("generate", ["--prompt", "hi", "--top-k", "-2"], "argument --top-k"),
    ("generate", ["--prompt", "hi", "--temperature", "-1"], "argument --temperature"),
    ("generate", ["--prompt", "hi", "--kv", "kivi3"], "unknown KV-cache policy 'kivi3'"),
    ("generate", ["--prompt", "hi", "--kv", "fp16", "--window", "8"], "need a quantized --kv"),
    ("generate", ["--prompt", "hi", "--kv", "kivi2", "--group-size", "48"], "G=48 does not divide head_dim=64"),
    ("generate", ["--prompt", "hi", "--kv", "kivi2", "--controller", "x.npz"], "--controller applies to mixed-learned"),
    ("generate", ["--prompt", "hi", "--kernels", "triton"], "argument --kernels: invalid choice"),
    ("generate", ["--prompt", "hi", "--model", "/nonexistent.gguf"], "not found"),
    ("generate", ["--max-new-tokens", "3"], "--prompt"),
    ("generate", ["--prompt-file", "/nonexistent.txt"], "argument --prompt-file: no file '/nonexistent.txt'"),
    ("generate", ["--prompt", "hi", "--max-memory", "0"], "argument --max-memory: must be > 0"),
    ("generate", ["--prompt", "hi", "--max-memory", "0.1"], "more than the 0.10 GiB this process may use"),
    ("perplexity", ["--context", "0"], "argument --context: must be >= 2, got 0"),
    ("perplexity", ["--context", "1"], "argument --context: must be >= 2, got 1"),
    ("perplexity", ["--context", "-5"], "argument --context: must be >= 2, got -5"),
    ("perplexity", ["--context", "16384"], "--context 16384 exceeds the model's 8192 tokens"),
    ("perplexity", ["--context", "16384", "--data-dir", "/nonexistent"], "--context 16384 exceeds"),  # numbers first
    ("perplexity", ["--segments", "0"], "argument --segments: must be >= 1, got 0"),
    ("perplexity", ["--text", "novel"], "argument --text: invalid choice"),
    ("perplexity", ["--kv", "band@5"], "2 < B <= 4"),
    ("perplexity", ["--json", "/etc/hostname/x.jsonl"], "argument --json: '/etc/hostname' is a file, not a folder"),
    ("perplexity", ["--json", "/tmp"], "argument --json: '/tmp' is a folder"),
    ("perplexity", ["--data-dir", "/nonexistent"], "not found: pass --data-dir"),
    ("perplexity", ["--kernels", "native"], "unrecognized arguments: --kernels native"),  # scoring runs no kernel
    ("bench", ["--contexts", "0"], "argument --contexts: must be >= 1, got 0"),
    ("bench", ["--contexts", "abc"], "argument --contexts: must be an integer, got 'abc'"),
    ("bench", ["--contexts", ""], "argument --contexts: needs at least one value"),
    ("bench", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    ("bench", ["--decode-steps", "0"], "argument --decode-steps: must be >= 1, got 0"),
    ("bench", ["--repeats", "0"], "argument --repeats"),
    ("bench", ["--kv-budget-gib", "0"], "argument --kv-budget-gib: must be > 0"),
    ("bench", ["--memory-budget-gib", "1"], "add --memory"),
    ("bench", ["--memory-budget-gib", "0"], "argument --memory-budget-gib: must be > 0"),
    ("bench", ["--contexts", "9000"], "exceeds the model's 8192 tokens"),
    ("bench", ["--preset", "SmolLM2-135M", "--kv", "kivi2", "--kv-budget-gib", "0.0001", "--contexts", "4096"],
     "does not fit 0.0001 GiB"),
    ("eval", ["--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ("eval", ["--batch-size", "0"], "argument --batch-size"),
    ("eval", ["--tasks", "mmlu"], "unknown task 'mmlu'"),
    ("eval", ["--kv", "fp16,kivi3"], "unknown KV-cache policy 'kivi3'"),
    ("eval", ["--kernels", "reference"], "unrecognized arguments: --kernels reference"),
    ("eval", ["--kv", "kivi2", "--group-size", "48", "--data-dir", "/nonexistent"], "G=48 does not divide"),
    ("train", ["--budget-bits", "1.5"], "argument --budget-bits: must be >= 2.0"),
    ("train", ["--budget-bits", "17"], "argument --budget-bits: must be <= 16"),
    ("train", ["--steps", "0"], "argument --steps"),
    ("train", ["--heldout", "1"], "argument --heldout: must be < 1"),
    ("train", ["--hidden", "128,x"], "argument --hidden: must be an integer"),
    ("train", ["--chunk", "100"], "--chunk 100 must be a multiple of --group-size 32"),
    ("train", ["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
    ("train", ["--data-dir", "/nonexistent"], "not found: pass --data-dir"),
    ("generate", ["--prompt", "hi", "--kv", "kivi2", "--allocation", "x.json"], "--allocation applies to learned-alloc"),
    ("generate", ["--prompt", "hi", "--kv", "learned-alloc@2.7"], "no shipped allocation for 2.7 bits"),
    ("generate", ["--prompt", "hi", "--kv", "learned-alloc@2.5", "--allocation", "/nonexistent.json"],
     "cannot read allocation /nonexistent.json"),
    ("allocate", ["--budget", "1.5", "--out", "/tmp/a.json"], "--budget must be in (2, 16)"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp/a.json", "--shares", "0.6,0.5"], "--shares must be positive"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp/a.json", "--steps", "0"], "argument --steps"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp/a.json", "--weights", "native"],
     "--weights native: this command differentiates through the model"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp/a.json", "--context", "100"], "argument --context: must be >= 165"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp"], "argument --out: '/tmp' is a folder"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp/a.json", "--text", "/nonexistent.txt"], "no such file"),
    ("report", ["--accuracy", "/nonexistent.json"], "nonexistent.json"),
    ("longctx", ["--tasks", "niah"], "--tasks: unknown 'niah'"),
    ("longctx", ["--haystacks", "essay,poem"], "--haystacks: unknown 'poem'"),
    ("longctx", ["--lengths", "256"], "argument --lengths: must be >= 512"),
    ("longctx", ["--lengths", "1024,16384", "--data-dir", "/nonexistent"], "--lengths 16384 exceeds the model's 8192"),
    ("longctx", ["--kv", "fp16,kivi3"], "unknown KV-cache policy 'kivi3'"),
    ("longctx", ["--samples", "0"], "argument --samples"),
    ("longctx", ["--data-dir", "/nonexistent"], "not found: pass --data-dir"),
    ("harness", ["--tasks", "arc_easy", "--log_samples"], "--log_samples needs --output_path"),
    ("harness", ["--tasks", "arc_easy", "--limit", "0"], "argument --limit"),
    ("kernel-bench", ["--contexts", "abc"], "argument --contexts"),
    ("kernel-bench", ["--models", "GPT-5"], "unknown model 'GPT-5'"),
    ("generate", ["--prompt", "hi", "--devices", "0"], "argument --devices: must be >= 1, got 0"),
    ("generate", ["--prompt", "hi", "--devices", "two"], "argument --devices: must be an integer, got 'two'"),
    ("generate", ["--prompt", "hi", "--devices", "999"], "--devices 999: this machine has"),
    ("perplexity", ["--devices", "999"], "--devices 999: this machine has"),
    ("eval", ["--devices", "999", "--limit", "1"], "--devices 999: this machine has"),
    ("train", ["--devices", "999"], "--devices 999: this machine has"),
    ("allocate", ["--budget", "2.5", "--out", "/tmp/a.json", "--devices", "999"], "--devices 999: this machine has"),
    ("bench", ["--devices", "999"], "--devices 999: this machine has"),
]


@pytest.mark.parametrize("command, argv, message", CASES, ids=[f"{c}:{' '.join(a)}" for c, a, _ in CASES])
def test_bad_input_is_one_line_before_the_model_loads(command, argv, message, capsys):
    code = COMMANDS[command].main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Pallas kernels run on GPU and TPU")
@pytest.mark.parametrize("command, argv", [("generate", ["--prompt", "hi"]), ("bench", ["--contexts", "64"])])
@pytest.mark.parametrize("kv", ["fp16", "kivi2"])
def test_kernels_a_cpu_cannot_run_are_refused_for_every_policy(command, argv, kv, capsys):
    assert COMMANDS[command].main(argv + ["--kv", kv, "--kernels", "pallas"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Pallas kernels compile for GPU and TPU only" in err[0], err


def test_train_controller_refuses_a_file_for_a_folder(tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("x")
    for flag in ("--traces", "--out"):
        assert train_main.main([flag, str(regular / "sub")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: argument {flag}:") and "is a file, not a folder" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_description(name):
    parser = COMMANDS[name]._parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name}: {action.option_strings} has no --help text"


@pytest.fixture
def no_compilation_cache():
    """JAX's compilation cache settings cleared for a test, and put back after it."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_compilation_cache_max_size", before[1])


def test_commands_keep_compiled_programs_under_kvjax_cache(tmp_path, monkeypatch, no_compilation_cache):
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_max_size == 2**30
    jax.config.update("jax_compilation_cache_dir", "/a/users/own/cache")  # JAX_COMPILATION_CACHE_DIR
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == "/a/users/own/cache"


def test_an_unwritable_cache_folder_is_one_line_and_no_cache(tmp_path, monkeypatch, capsys, no_compilation_cache):
    regular = tmp_path / "file"
    regular.write_text("x")
    monkeypatch.setenv("KVJAX_CACHE", str(regular))  # a file where the folder should be
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compiled programs are not kept" in err[0], err
