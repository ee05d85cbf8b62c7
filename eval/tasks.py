"""Zero-shot multiple-choice tasks as log-likelihood requests (lm-evaluation-harness prompts).

Each loader turns one dataset row into a `Request`: one (context, continuation) pair per
choice. The model's answer is the choice whose continuation is most likely given its
context. Most tasks share one context; WinoGrande ("partial evaluation") puts each option
into its own context and scores the shared rest of the sentence.

Data: the `hf_datasets/<name>/<config>/validation` folders of the data folder (see its
MANIFEST.md), read with `datasets.load_from_disk`: `--data-dir`, else $KVJAX_DATA, else
../shared/data beside the repository.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

from kvjax.data import DATA_DIR
from kvjax.errors import KvjaxError

TARGET_DELIMITER = " "  # the harness's separator between context and choice


@dataclasses.dataclass(frozen=True)
class Request:
    """One example: contexts[i] + continuations[i] for each choice i; `label` is the right one."""

    contexts: list[str]
    continuations: list[str]
    label: int

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or not self.contexts:
            raise ValueError("a request needs one context per continuation, at least one")
        if not 0 <= self.label < len(self.continuations):
            raise ValueError(f"label {self.label} out of range for {len(self.continuations)} choices")


def shared_context(context: str, choices: list[str], label: int) -> Request:
    """A request whose choices all follow the same context, each after the target delimiter."""
    return Request([context] * len(choices), [TARGET_DELIMITER + c for c in choices], label)


# ----------------------------------------------------------------------------- one row -> Request


def hellaswag_preprocess(text: str) -> str:
    """The harness's clean-up of WikiHow artifacts: ' [title]' -> '. ', '[header]' etc. removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Request:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return shared_context(context, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def arc(row: dict) -> Request:
    choices = row["choices"]
    if row["answerKey"] not in choices["label"]:
        raise KvjaxError(f"ARC row {row.get('id')}: answer key {row['answerKey']!r} not in {choices['label']}")
    return shared_context(f"Question: {row['question']}\nAnswer:", list(choices["text"]),
                          choices["label"].index(row["answerKey"]))


def openbookqa(row: dict) -> Request:
    choices = row["choices"]
    return shared_context(row["question_stem"], list(choices["text"]), choices["label"].index(row["answerKey"]))


def winogrande(row: dict) -> Request:
    """Partial evaluation: context = sentence up to '_' with the option; target = the rest."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    target = TARGET_DELIMITER + sentence[blank + 1:].strip()
    options = [row["option1"], row["option2"]]
    return Request([sentence[:blank] + o for o in options], [target, target], int(row["answer"]) - 1)


def boolq(row: dict) -> Request:
    return shared_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"],
                          int(row["answer"]))


# name -> (folder under hf_datasets, row -> Request)
TASKS: dict[str, tuple[str, Callable[[dict], Request]]] = {
    "hellaswag": ("hellaswag/none/validation", hellaswag),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", arc),
    "openbookqa": ("openbookqa/main/validation", openbookqa),
    "winogrande": ("winogrande/winogrande_xl/validation", winogrande),
    "boolq": ("boolq/none/validation", boolq),
}


def check_task(name: str):
    if name not in TASKS:
        raise KvjaxError(f"unknown task {name!r}; known: {', '.join(TASKS)}")


def load_task(name: str, data_dir: str = DATA_DIR, limit: int | None = None) -> list[Request]:
    """The first `limit` (all if None) requests of task `name`, in stored order."""
    import datasets

    check_task(name)
    folder, to_request = TASKS[name]
    path = os.path.join(data_dir, "hf_datasets", folder)
    if not os.path.exists(os.path.join(path, "state.json")):
        raise KvjaxError(f"{path} not found: pass --data-dir (the shared data folder, see its MANIFEST.md)")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # damaged folder: say which, in one line
        raise KvjaxError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [to_request(row) for row in ds]
