"""The evaluation suite (python -m eval): task prompts, continuation scoring, accuracy, resuming."""

import json
import os
import re

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import scoring, tasks
from eval.__main__ import count_changed, main, read_cache
from eval.tasks import Request, load_task
from kvjax.data import DATA_DIR
from kvjax.errors import KvjaxError
from kvjax.loading import load_model
from kvjax.model import forward
from kvjax.policies import get_policy

# head_dim 16 of the tiny model: G must divide it, R be a multiple of G
TINY_KIVI2 = get_policy("kivi2", window=8, group_size=4)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint.hf_folder)


def requests_for_scoring():
    """8 pairs of 3 lengths (byte tokens): 22 and 34 in the 64 bucket, 96 in the 128 bucket."""
    long_ctx = "A long context that needs a second length bucket: " + "abc " * 10  # trailing space
    return [Request(["The cat sat on the"] * 3, [" mat", " hat and the dog", " sun"], 0),
            Request([long_ctx] * 2, [" yes", " no!"], 1),
            Request(["The dog sat on the", "The cat ran to the", "A cat sat on a lot"], [" mat"] * 3, 2)]


def reference_logprob(model, context, continuation, spec=None):
    """Summed log p(continuation | context) from one pass over context_enc + continuation_enc.

    fp16: an unpadded forward, an independent check of the scorer's padding and batching (they
    change only float32 summation order). A quantized policy: the sequence alone, right-padded to
    its length bucket, through the scorer's own jitted function at batch 1. The shapes must match
    the scorer's: a matmul of another shape may round a key one ulp differently and flip its code
    (tests/replay.py), so only the same program on the same shapes gives bit-identical logits.
    """
    stripped = context.rstrip()  # the harness moves trailing spaces into the continuation
    continuation = context[len(stripped):] + continuation
    ctx, cont = model.tokenizer.encode(stripped), model.tokenizer.encode(continuation)
    ids = ctx + cont
    if spec is None:
        positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
        logits, _ = jax.jit(forward, static_argnums=1)(model.params, model.cfg, jnp.asarray([ids], jnp.int32),
                                                       positions)
        logits = np.asarray(logits[0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return sum(logp[t - 1, ids[t]] for t in range(len(ctx), len(ids)))
    n = len(ids) - 1
    length = scoring.bucket_length(n, model.cfg.max_position_embeddings)
    pad = lambda x, fill: np.asarray([x + [fill] * (length - len(x))], np.int32)
    logp, _ = scoring.target_logprobs(model.params, pad(ids[:-1], 0), pad(ids[1:], 0), pad(list(range(n)), -1),
                                      cfg=model.cfg, policy=spec)
    return float(np.asarray(logp[0, n - len(cont):n], np.float64).sum())


@pytest.mark.parametrize("policy", ["fp16", TINY_KIVI2], ids=["fp16", "kivi2"])
def test_scores_equal_hand_computed_loglikelihood(tiny, policy):
    reqs = requests_for_scoring()
    spec = None if policy == "fp16" else policy
    # fp16: spare rows and two buckets; kivi2: one sequence per pass, as its reference runs
    got = scoring.score_requests(tiny, reqs, policy, batch_size=3 if spec is None else 1)
    for req, scores in zip(reqs, got):
        want = [reference_logprob(tiny, c, x, spec) for c, x in zip(req.contexts, req.continuations)]
        np.testing.assert_allclose(scores, want, rtol=1e-4 if spec is None else 1e-6, atol=1e-4 if spec is None else 1e-6)


def test_quantized_policy_changes_scores(tiny):
    reqs = requests_for_scoring()  # the shapes compiled above
    fp16 = np.concatenate(scoring.score_requests(tiny, reqs, "fp16", 3))
    kivi2 = np.concatenate(scoring.score_requests(tiny, reqs, TINY_KIVI2, 3))
    assert np.abs(fp16 - kivi2).max() > 1e-3


def test_pairs_are_encoded_as_the_harness_encodes_them():
    """Trailing spaces move to the continuation; the whole text is encoded and cut after the context's
    tokens (a merge across the boundary goes to the context's side, as in the harness); no BOS; an
    empty context is the BOS (the prefix token)."""
    class Chars:  # one token per character, "ab" merged into one, BOS 7 where the model wants it
        bos_id, eos_id = 7, 8

        @staticmethod
        def encode(text, bos=True):
            return [7] * bos + [256 if ch == "ab" else ord(ch[0]) for ch in re.findall("ab|.", text, re.S)]

    assert scoring.encode_pair(Chars, "Answer: ", "yes") == ([ord(c) for c in "Answer:"], [ord(c) for c in " yes"])
    assert scoring.encode_pair(Chars, "", "x") == ([7], [ord("x")])
    assert scoring.encode_pair(Chars, "xa", "bc") == ([ord("x"), ord("a")], [ord("c")])
    Chars.bos_id = None
    assert scoring.encode_pair(Chars, "", "x") == ([8], [ord("x")])


def test_accuracy_on_fixture_scores():
    reqs = [Request(["q"] * 2, [" a", " bbbb"], 1),  # sum: a (wrong); per byte: -1/1 < -1.5/4, bbbb (right)
            Request(["q"] * 3, [" x", " yy", " zzz"], 2),  # sum: x; per byte: -0.5, -1, -0.3: zzz
            Request(["q"] * 2, [" é", " abc"], 0)]  # sum: é (right); per byte: -1/2 > -1.6/3, é (right)
    scores = [[-1.0, -1.5], [-0.5, -2.0, -0.9], [-1.0, -1.6]]
    assert [scoring.choice_bytes(c) for c in reqs[2].continuations] == [2, 3]  # by characters abc would win
    result = scoring.accuracy(reqs, scores)
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1.0), "n": 3}
    # another policy's scores: the second request's answers move (x -> yy by sum, zzz -> yy per byte)
    other = [[-1.0, -1.5], [-0.5, -0.4, -0.9], [-1.0, -1.6]]
    results = {"fp16": {}, "q": {}}
    count_changed(reqs, {"fp16": scores, "q": other}, results)
    assert results == {"fp16": {"changed": 0, "changed_norm": 0}, "q": {"changed": 1, "changed_norm": 1}}


def test_hellaswag_preprocess():
    assert tasks.hellaswag_preprocess(" How to cook [title] Boil water. [step] Add salt. ") \
        == "How to cook. Boil water. Add salt."


needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "hf_datasets")),
                                reason=f"no evaluation data at {DATA_DIR} (set KVJAX_DATA to the folder "
                                       "holding hf_datasets/, see README 'Evaluation data')")


@needs_data
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_task_loaders_on_shared_data(name):
    reqs = load_task(name, DATA_DIR, limit=2)
    assert len(reqs) == 2
    for r in reqs:
        assert all(c.strip() for c in r.contexts) and all(x.startswith(" ") for x in r.continuations)
        assert len(r.continuations) == {"hellaswag": 4, "winogrande": 2, "boolq": 2}.get(name, len(r.contexts))
    first = reqs[0]
    if name == "hellaswag":
        assert first.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
        assert first.continuations[3] == " starts pulling up roofing on a roof." and first.label == 3
    elif name == "arc_easy":
        assert first.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
        assert first.continuations[0] == " cellular telephone" and first.label == 0
    elif name == "winogrande":
        assert first.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                                  "Sarah was a much better surgeon than Maria so Maria"]
        assert first.continuations == [" always got the easier cases."] * 2 and first.label == 1
    elif name == "boolq":
        assert first.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
        assert first.continuations == [" no", " yes"] and first.label == 0
    elif name == "openbookqa":
        assert first.contexts[0].startswith("Frilled sharks") and first.label == 0


def test_load_task_errors(tmp_path):
    with pytest.raises(KvjaxError, match="unknown task 'nope'"):
        load_task("nope", str(tmp_path))
    with pytest.raises(KvjaxError, match="not found"):
        load_task("arc_easy", str(tmp_path))


def write_arc_fixture(root, n=5):
    """A small ARC-Easy-shaped dataset (short questions: one length bucket)."""
    rows = [{"id": f"q{i}", "question": f"What is {i} plus {i}?",
             "choices": {"text": [str(2 * i), str(2 * i + 1), "ten"], "label": ["A", "B", "C"]},
             "answerKey": "AB"[i % 2]} for i in range(n)]
    datasets.Dataset.from_list(rows).save_to_disk(os.path.join(root, "hf_datasets", "ai2_arc", "ARC-Easy",
                                                               "validation"))


def test_interrupted_run_resumes_to_the_same_results(tiny_checkpoint, tmp_path):
    write_arc_fixture(tmp_path / "data")
    common = ["--tasks", "arc_easy", "--kv", "fp16,kivi2", "--residual", "8", "--group-size", "4",
              "--limit", "4", "--batch-size", "2", "--model", tiny_checkpoint.hf_folder,
              "--data-dir", str(tmp_path / "data")]
    run = lambda name: main(common + ["--out", str(tmp_path / name), "--cache-dir", str(tmp_path / f"cache-{name}")])

    assert run("full") == 0
    assert run("cut") == 0
    cache_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache-cut") for f in fs]
    assert [os.path.basename(p) for p in cache_files] == ["arc_easy.jsonl.gz"]  # one archive per task
    (path,) = cache_files
    assert sorted(read_cache(path, "kivi2-R8-G4")) == [0, 1, 2, 3] and sorted(read_cache(path, "fp16")) == [0, 1, 2, 3]
    data = open(path, "rb").read()  # an interruption: the archive cut short in the middle of a record
    open(path, "wb").write(data[:len(data) * 3 // 4])
    kept = len(read_cache(path, "fp16")) + len(read_cache(path, "kivi2-R8-G4"))
    assert kept < 8
    assert run("cut") == 0
    assert run("cut") == 0  # and a third run finds everything
    results = [json.load(open(tmp_path / name / "results.json")) for name in ("full", "cut")]
    assert results[0]["results"] == results[1]["results"]
    assert results[0]["results"]["arc_easy"]["kivi2"]["n"] == 4
    assert results[0]["results"]["arc_easy"]["fp16"]["changed"] == 0
    assert "Answers that differ from fp16's" in open(tmp_path / "cut" / "results.md").read()
    for name in ("results.md", "results.png"):
        assert os.path.getsize(tmp_path / "cut" / name) > 0
    assert sorted(read_cache(path, "fp16")) == sorted(read_cache(path, "kivi2-R8-G4")) == [0, 1, 2, 3]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "nope"], "error: unknown task 'nope'"),
    (["--kv", "fp16,kivi3"], "error: unknown KV-cache policy 'kivi3'"),
    (["--data-dir", "/nonexistent"], "error: /nonexistent/hf_datasets/"),
    pytest.param(["--model", "/nonexistent.gguf", "--limit", "1"], "error: model '/nonexistent.gguf' not found",
                 marks=needs_data),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
