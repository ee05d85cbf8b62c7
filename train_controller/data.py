"""Training text for the controller, kept apart from every evaluation text.

Default: Project Gutenberg #1661 (kvjax.data's `sherlock`, from the shared data folder) *after
its first `SHERLOCK_EVAL_TOKENS` tokens*. `python -m eval.perplexity --text
sherlock` scores segments from the start of the same token stream (the README's table: 2 x
4096 tokens; anything up to 8 x 4096 stays clear of this range). WikiText-2 test and the
multiple-choice validation sets are never read here. `--text FILE` trains on a file instead.
"""

from __future__ import annotations

import os

import numpy as np

from kvjax.data import DATA_DIR, SHERLOCK_EVAL_TOKENS, read_text, text_path
from kvjax.errors import KvjaxError


def check_training_text(text_file: str | None = None, data_dir: str = DATA_DIR):
    """A KvjaxError unless the training text is there: `--text FILE`, else the data folder's Sherlock
    (the commands call this before they load the model)."""
    if text_file is None:
        text_path("sherlock", data_dir)
    elif not os.path.isfile(text_file):
        raise KvjaxError(f"--text {text_file}: no such file")


def training_ids(tokenizer, text_file: str | None = None, data_dir: str = DATA_DIR,
                 max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the training text (at most `max_tokens`)."""
    if text_file:
        try:
            with open(text_file, encoding="utf-8") as f:
                ids = tokenizer.encode(f.read())
        except OSError as e:
            raise KvjaxError(f"cannot read --text {text_file}: {e.strerror}") from None
    else:
        ids = tokenizer.encode(read_text("sherlock", data_dir))[SHERLOCK_EVAL_TOKENS:]
    ids = np.asarray(ids, np.int32)
    return ids[:max_tokens] if max_tokens else ids


def token_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The frequency table: count per token id [V]."""
    return np.bincount(ids, minlength=vocab_size)[:vocab_size].astype(np.int32)
