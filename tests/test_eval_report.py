"""`python -m eval.report` assembles accuracy, perplexity and latency outputs into one Markdown report."""

import json
import os

import pytest

from eval.report import main

ACCURACY = {
    "command": "python -m eval --tasks arc_easy --kv fp16,kivi2", "device": "gpu NVIDIA H100", "date": "2026-11-23",
    "model": "/x/smollm2.gguf", "tasks": ["arc_easy"], "policies": ["fp16", "kivi2"],
    "average_bits": {"fp16": 16.0, "kivi2": 2.0},
    "results": {"arc_easy": {"fp16": {"acc": 0.5, "acc_norm": 0.25, "n": 4},
                             "kivi2": {"acc": 0.75, "acc_norm": 0.5, "n": 4}}},
}
PERPLEXITY = [
    {"policy": "fp16", "text": "wikitext2", "context": 4096, "perplexity": 19.04, "kv_bytes_per_token": 23040},
    {"policy": "kivi2", "text": "wikitext2", "context": 4096, "perplexity": 23.86, "kv_bytes_per_token": 4999},
    {"policy": "kivi2", "text": "sherlock", "context": 4096, "perplexity": 25.49, "kv_bytes_per_token": 4999,
     "average_bits": 2.0, "histogram": {"2": 1.0}},
]
LATENCY = [
    {"model": "random SmolLM-360M", "device": "NVIDIA H100", "batch": 1, "dtype": "bfloat16", "jax": "0.11.2",
     "date": "2026-11-23", "command": "python -m kvjax.bench --preset SmolLM-360M", "kv": kv, "context": c,
     "decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms, "kv_bytes": 2**20 * mib,
     "note": "transcribed from BENCHMARKS.md."}
    for kv, c, ms, mib in [("fp16", 8192, 2.76, 320.7), ("fp16", 32768, 4.44, 1280.7),
                           ("kivi2", 8192, 3.92, 65.0), ("kivi2", 32768, 4.37, 245.0)]
]


def write_inputs(folder):
    (folder / "results.json").write_text(json.dumps(ACCURACY))
    (folder / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PERPLEXITY))
    (folder / "ppl2.jsonl").write_text(json.dumps({"policy": "mixed-learned@3", "text": "wikitext2", "context": 4096,
                                                   "perplexity": 20.18, "kv_bytes_per_token": 6598,
                                                   "controller": "mine.npz"}) + "\n"
                                       + json.dumps({"policy": "learned-alloc@2.5", "text": "wikitext2",
                                                     "context": 4096, "perplexity": 19.3}) + "\n"
                                       + json.dumps({"policy": "learned-alloc@3", "text": "wikitext2", "context": 4096,
                                                     "perplexity": 19.2, "allocation": "mine.json"}) + "\n")
    (folder / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LATENCY))


def test_report_has_every_section_and_plot(tmp_path):
    write_inputs(tmp_path)
    out = tmp_path / "docs" / "RESULTS.md"
    assert main(["--accuracy", str(tmp_path / "results.json"), "--perplexity", str(tmp_path / "ppl.jsonl"),
                 str(tmp_path / "ppl2.jsonl"), "--latency", str(tmp_path / "bench.jsonl"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| kivi2 | 2 | 0.750 | 0.500 |" in text  # accuracy row
    assert "| fp16 | - | 19.04 | 23040 |" in text  # sherlock @4096 column first (sorted), fp16 has none
    assert "| kivi2 | 25.49 | 23.86 | 4999 |" in text
    assert "| mixed-learned@3 (mine.npz) | - | 20.18 | 6598 |" in text  # from the second file
    assert "| kivi2 | sherlock @4096 | 2.00 | 0.000 | 0.000 | 0.000 | 1.000 | 0.000 |" in text  # widths
    assert "| kivi2 | 32768 | 4.37 | 228.8 | 245.0 |" in text  # latency row
    assert text.count("Note: transcribed from BENCHMARKS.md.") == 1
    assert "python -m kvjax.bench --preset SmolLM-360M" in text and "gpu NVIDIA H100" in text
    assert "| learned-alloc@2.5 | - | 19.30 | - |" in text
    assert "| learned-alloc@3 (mine.json) | - | 19.20 | - |" in text
    assert "RESULTS-allocation-3.png" not in text  # its own file: no picture of the shipped one
    for png in ("RESULTS-accuracy.png", "RESULTS-latency.png", "RESULTS-widths.png", "RESULTS-allocation-2.5.png"):
        assert os.path.getsize(out.parent / png) > 1000 and f"]({png})" in text


@pytest.mark.parametrize("argv, message", [
    ([], "give at least one of"),
    (["--latency", "/nonexistent.jsonl"], "no such file: /nonexistent.jsonl"),
    (["--perplexity", "{bad}"], "is not a JSON line"),
    (["--accuracy", "{ppl}"], "is not a results.json"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"policy": "fp16"}\nnot json\n')
    write_inputs(tmp_path)
    argv = [a.format(bad=tmp_path / "bad.jsonl", ppl=tmp_path / "ppl.jsonl") for a in argv]
    assert main(argv + ["--out", str(tmp_path / "R.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
