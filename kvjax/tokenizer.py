"""Tokenizers for kvjax models, built with the `tokenizers` library.

From a GGUF file the byte-level BPE is rebuilt from the metadata (tokens, merges,
special tokens, pre-tokenizer); from a HF folder `tokenizer.json` is read as is.
Chat templates (Jinja) are rendered the way `transformers` renders them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from kvjax.errors import KvjaxError

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


@dataclasses.dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool = False
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, after the BOS token where the model wants one (and `bos` allows)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders messages [{"role", "content"}] with the model's template."""
        if not self.chat_template:
            raise KvjaxError("this model has no chat template; drop --chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise KvjaxError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        tok = lambda i: self.backend.id_to_token(i) if i is not None else ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok(self.bos_id), eos_token=tok(self.eos_id))


def _gguf_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits digits one by one before the GPT-2 regex for these models.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", ""):
        return byte_level
    raise KvjaxError(f"unsupported GGUF tokenizer pre-tokenizer {pre!r}")


def from_gguf_metadata(meta: dict) -> Tokenizer:
    """Builds the tokenizer from GGUF `tokenizer.ggml.*` metadata (a dict of plain values)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KvjaxError(f"unsupported GGUF tokenizer model {kind!r}; kvjax reads byte-level BPE ('gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    backend.add_special_tokens(special)
    return Tokenizer(backend=backend,
                     bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                     eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"))


def from_hf_folder(folder: str, bos_id: int | None, eos_id: int | None) -> Tokenizer:
    """Reads `tokenizer.json` (and the chat template of `tokenizer_config.json`) from a HF folder."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise KvjaxError(f"{folder}: no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(path)
    template, add_bos = None, False
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            tok_cfg = json.load(f)
        template = tok_cfg.get("chat_template")
        add_bos = bool(tok_cfg.get("add_bos_token", False))
        eos_token = tok_cfg.get("eos_token")
        if isinstance(eos_token, dict):
            eos_token = eos_token.get("content")
        if isinstance(eos_token, str) and backend.token_to_id(eos_token) is not None:
            eos_id = backend.token_to_id(eos_token)
    return Tokenizer(backend=backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                     chat_template=template)
