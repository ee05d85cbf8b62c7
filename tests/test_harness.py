"""kvjax inside lm-evaluation-harness (eval.harness_lm, eval.harness): the harness's prompts are
`python -m eval`'s, and the harness model answers through kvjax's own scorer and generator."""

import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the [harness] extra)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from eval import harness_lm, scoring, tasks  # noqa: E402
from eval.harness import main  # noqa: E402
from kvjax.data import DATA_DIR  # noqa: E402
from kvjax.errors import KvjaxError  # noqa: E402
from kvjax.generation import generate  # noqa: E402
from kvjax.loading import load_model  # noqa: E402
from kvjax.policies import get_policy  # noqa: E402

HAS_DATA = all(os.path.exists(os.path.join(DATA_DIR, "hf_datasets", tasks.TASKS[n][0], "state.json"))
               for n in harness_lm.LOCAL_TASKS)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint.hf_folder)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.mark.skipif(not HAS_DATA, reason=f"the shared data folder is not at {DATA_DIR} (set $KVJAX_DATA)")
def test_harness_prompts_are_python_m_evals():
    """The first examples of every local task: the same (context, continuation) pairs and labels from the
    harness's task configs as from eval.tasks, so both paths score the same tokens."""
    limit = 12
    for task in harness_lm.local_tasks(list(harness_lm.LOCAL_TASKS), DATA_DIR):
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        by_doc: dict[int, list] = {}
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            by_doc.setdefault(inst.doc_id, []).append(inst.args)
        mine = tasks.load_task(task.config.task, DATA_DIR, limit)
        assert len(by_doc) == len(mine) == limit, task.config.task
        docs = list(task.eval_docs)[:limit]
        for doc_id, req in enumerate(mine):
            assert by_doc[doc_id] == list(zip(req.contexts, req.continuations)), (task.config.task, doc_id)
            doc = docs[doc_id]  # the harness's gold: winogrande's is its "text" (one context per option)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert gold == req.label, (task.config.task, doc_id)


@pytest.mark.parametrize("kv", ["fp16", "kivi2"])
def test_loglikelihood_is_the_scorers(tiny, kv):
    """The harness's loglikelihood is score_requests' sum, and is_greedy says whether every continuation
    token is the scorer's most likely one (checked against a continuation made of those tokens)."""
    margs = {"window": 8, "group_size": 4} if kv != "fp16" else {}
    lm = harness_lm.KvjaxLM(kv=kv, loaded=tiny, batch_size=3, **margs)
    pairs = [("The cat sat on", " the mat"), ("A much longer context, " * 6, " and a reply."), ("", "x y")]
    got = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    want = scoring.score_requests(tiny, [tasks.Request([c], [x], 0) for c, x in pairs], lm.policy, batch_size=3)
    assert [g[0] for g in got] == [w[0] for w in want]
    ids = tiny.tokenizer.encode("Once upon a time")  # its greedy continuation scores as greedy
    greedy = generate(tiny, [ids], max_new_tokens=4, kv=lm.policy).tokens[0]
    other = greedy[:-1] + [(greedy[-1] + 1) % tiny.cfg.vocab_size]
    (ll, is_greedy), (_, other_greedy) = scoring.score_tokens(tiny, [(ids, greedy), (ids, other)], lm.policy, 2)
    assert is_greedy and ll < 0 and not other_greedy
    assert [g[1] for g in got] == [g for _, g in scoring.score_tokens(
        tiny, [scoring.encode_pair(tiny.tokenizer, c, x) for c, x in pairs], lm.policy, 3)]


def test_loglikelihood_rolling_is_the_texts_logprob(tiny):
    """A text longer than the model's context: rolling windows cover every token once; their sum equals
    scoring each window apart, and for a short text the plain log-probability after the prefix token."""
    lm = harness_lm.KvjaxLM(kv="fp16", loaded=tiny, batch_size=2)
    short = "A short text to score."
    ids = tiny.tokenizer.encode(short, bos=False)
    assert lm.prefix_id == scoring.prefix_id(tiny.tokenizer) == tiny.tokenizer.bos_id  # BOS, as the harness's
    (whole,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", short)])
    assert whole == scoring.score_tokens(tiny, [([lm.prefix_id], ids)], lm.policy, 2)[0][0]
    long_text = "abcdefghij " * 70  # 770 byte tokens > 512: the harness's windows, each token predicted once
    (rolled,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", long_text)])
    ids = tiny.tokenizer.encode(long_text, bos=False)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_id, 512, 1)]
    assert len(windows) == 2 and sum(len(c) for _, c in windows) == len(ids)
    parts = scoring.score_tokens(tiny, windows, lm.policy, 2)
    np.testing.assert_allclose(rolled, parts[0][0] + parts[1][0], rtol=1e-6)


def test_generate_until_is_kvjax_generate_cut_at_a_stop(tiny):
    lm = harness_lm.KvjaxLM(kv="kivi2", window=8, group_size=4, loaded=tiny, batch_size=2)
    prompts = ["Hello there", "A longer prompt than the first one", "Third"]
    settings = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([request("generate_until", p, dict(settings)) for p in prompts])
    for prompt, text in zip(prompts, got):
        full = generate(tiny, [tiny.tokenizer.encode(prompt, bos=False)], max_new_tokens=12, kv=lm.policy).texts[0]
        assert text == full.split("e")[0]
    # the harness's other spellings: a single stop string, max_new_tokens for max_gen_toks
    (alias,) = lm.generate_until([request("generate_until", prompts[0], {"until": "e", "max_new_tokens": 6})])
    full = generate(tiny, [tiny.tokenizer.encode(prompts[0], bos=False)], max_new_tokens=6, kv=lm.policy).texts[0]
    assert alias == full.split("e")[0]
    with pytest.raises(KvjaxError, match="leaves no room"):
        lm.generate_until([request("generate_until", "x", {"until": [], "max_gen_toks": 512})])


def test_bad_model_args_are_one_line_before_the_model_loads(capsys):
    assert main(["--tasks", "arc_easy", "--model_args", "kv=kivi9"]) == 2
    assert main(["--tasks", "arc_easy", "--model_args", "kv=fp16,colour=blue"]) == 2
    assert main(["--tasks", "no_such_task", "--model_args", "kv=fp16"]) == 2
    assert main(["--tasks", "arc_easy", "--model_args", "kv=fp16,batch_size=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["error"] * 4, err
    assert "kivi9" in err[0] and "colour" in err[1] and "no_such_task" in err[2] and "--batch_size" in err[3]


def test_policy_args_match_the_flags():
    lm_policy = harness_lm.policy_from_flags(harness_lm.policy_args("kivi2", window=16, group_size=16))
    assert lm_policy == get_policy("kivi2", window=16, group_size=16)
