"""The shared data folder and the texts in it, for the commands that evaluate (eval) and train
(train_controller): one place, which both import.

The folder: `--data-dir`, else $KVJAX_DATA, else ../shared/data beside the repository (its
MANIFEST.md lists what it holds). Texts, read whole by `read_text`:

  wikitext2  the WikiText-2 test split in its word-level *tokenized* form (wiki.test.tokens:
             `<unk>`, ` @-@ `), one stream
  sherlock   Project Gutenberg #1661 between its START/END markers: its first SHERLOCK_EVAL_TOKENS
             tokens are for evaluation only (eval.perplexity's segments, eval.longctx's haystack),
             train_controller trains on what follows (train_controller.data)

The multiple-choice tasks are Hugging Face `datasets` folders under hf_datasets/ (eval.tasks).
"""

from __future__ import annotations

import os

from kvjax.errors import KvjaxError

DATA_DIR = os.environ.get("KVJAX_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
TEXTS = {"wikitext2": "wikitext-2/test.txt", "sherlock": "gutenberg/sherlock.txt"}
SHERLOCK_EVAL_TOKENS = 32768  # in the model's tokens: up to 8 x 4096 perplexity segments


def text_path(name: str, data_dir: str = DATA_DIR) -> str:
    """The file of the text called `name` (a key of TEXTS); a KvjaxError if it is not there (a command
    asks before it loads the model)."""
    if name not in TEXTS:
        raise KvjaxError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    path = os.path.join(data_dir, TEXTS[name])
    if not os.path.exists(path):
        raise KvjaxError(f"{path} not found: pass --data-dir (the shared data folder)")
    return path


def read_text(name: str, data_dir: str = DATA_DIR) -> str:
    """The text called `name` from the data folder (see `text_path`)."""
    with open(text_path(name, data_dir), encoding="utf-8-sig") as f:  # sherlock.txt starts with a BOM
        text = f.read().replace("\r\n", "\n")
    if name == "sherlock":
        start = text.index("\n", text.index("*** START OF")) + 1
        text = text[start:text.index("*** END OF")]
    return text
