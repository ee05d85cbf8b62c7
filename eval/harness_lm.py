"""kvjax as an lm-evaluation-harness model (`kvjax`, registered on import; lm-eval 0.4.x), following
the conventions of the harness's Hugging Face model:

    loglikelihood          eval.scoring.score_tokens: the exact teacher-forced scorer of the policy,
                           pairs tokenized as the harness does (eval.scoring.encode_pair)
    loglikelihood_rolling  the harness's rolling windows of the model's context, scored the same way
    generate_until         kvjax.generate: the policy's own prefill and decode, greedy or sampled
                           (the harness's normalized settings), cut at the first stop sequence;
                           contexts keep their last (context - max_gen_toks) tokens

Model args (`model_args="kv=kivi2,window=16"`, MODEL_ARGS): model (a .gguf, HF folder or hub id;
default the embedded SmolLM2), kv, window, group_size, sinks, controller, allocation (as --kv and
its flags), dtype and kernels (of generation), weights, devices (a count or `all`, the default: each batch
split over them, kvjax.sharding), max_gen_toks (default 256), and batch_size (`python -m eval.harness`
takes it as --batch_size; per device). `local_tasks` builds the harness's own task
configs over the data folder's saved datasets instead of the hub.
"""

from __future__ import annotations

import argparse
import os

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from eval.scoring import encode_pair, prefix_id, score_tokens
from eval.tasks import TASKS
from kvjax import sharding
from kvjax.errors import KvjaxError
from kvjax.flags import kernels_from_flags, policy_from_flags, weights_from_flags
from kvjax.generation import generate
from kvjax.loading import load_model
from kvjax.model import DTYPES
from kvjax.sampling import SamplingConfig

# the harness's tasks whose split the data folder holds (eval.tasks' folders): evaluated on it
LOCAL_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "boolq")
MODEL_ARGS = ("model", "kv", "window", "group_size", "sinks", "controller", "allocation", "dtype", "kernels", "weights",
              "devices", "max_gen_toks", "batch_size")


def policy_args(kv: str = "fp16", window=None, group_size=None, sinks=None, controller=None, allocation=None,
                kernels: str = "auto", weights: str = "auto") -> argparse.Namespace:
    """Model args as the command-line flags kvjax.flags reads."""
    return argparse.Namespace(kv=str(kv), window=window, group_size=group_size, sinks=sinks, controller=controller,
                              allocation=allocation, kernels=str(kernels), weights=str(weights))


@register_model("kvjax")
class KvjaxLM(LM):
    """A kvjax model and KV-cache policy, as the harness calls a model. `loaded`: a LoadedModel to use
    instead of loading `model`; the harness's own device and max_batch_size arguments are ignored."""

    def __init__(self, model: str | None = None, kv: str = "fp16", window=None, group_size=None, sinks=None,
                 controller=None, allocation=None, batch_size=8, dtype: str = "float32", kernels: str = "auto",
                 weights: str = "auto", devices="all", max_gen_toks: int = 256, loaded=None, **unused):
        super().__init__()
        flags = policy_args(kv, window, group_size, sinks, controller, allocation, kernels, weights)
        self.policy = policy_from_flags(flags)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise KvjaxError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if dtype not in DTYPES:
            raise KvjaxError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        self.batch_size, self.dtype, self.max_gen_toks = int(batch_size), dtype, int(max_gen_toks)
        if str(devices) != "all" and (not str(devices).isdigit() or int(devices) < 1):
            raise KvjaxError(f"devices must be a whole number >= 1 or 'all', got {devices!r}")
        self.mesh = sharding.make_mesh(None if str(devices) == "all" else int(devices))
        self.backend = kernels_from_flags(flags)
        self.model = loaded or load_model(model, weights=weights_from_flags(flags))
        self.policy.check(self.model.cfg)
        self.prefix_id = prefix_id(self.model.tokenizer)

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        with tqdm(total=len(pairs), desc=desc, disable=self.rank != 0) as bar:
            return score_tokens(self.model, pairs, self.policy, self.batch_size, lambda *_: bar.update(1), self.mesh)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        tok = self.model.tokenizer
        pairs = [encode_pair(tok, context, continuation) for context, continuation in (r.args for r in requests)]
        return self._score(pairs, f"loglikelihood ({self.policy.name})")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            ids = self.model.tokenizer.encode(text, bos=False)
            for pair in get_rolling_token_windows(ids, self.prefix_id, self.max_length, 1):
                windows.append(make_disjoint_window(pair))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(windows, f"loglikelihood_rolling ({self.policy.name})")):
            totals[i] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation settings, longest first in batches of batch_size."""
        tok = self.model.tokenizer
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        with tqdm(total=len(requests), desc=f"generate_until ({self.policy.name})", disable=self.rank != 0) as bar:
            for members in groups.values():
                settings = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(settings.pop("until", None), eos=None)  # generation stops at EOS
                max_new = settings["max_gen_toks"]
                keep = self.max_length - max_new
                if keep < 1:
                    raise KvjaxError(f"max_gen_toks {max_new} leaves no room for a context in {self.max_length} tokens")
                sampling = SamplingConfig(temperature=float(settings.get("temperature", 0.0)),
                                          top_k=int(settings.get("top_k") or 0), top_p=float(settings.get("top_p") or 1.0))
                ids = {i: tok.encode(requests[i].args[0], bos=False)[-keep:] or [self.prefix_id] for i in members}
                members.sort(key=lambda i: -len(ids[i]))
                rows = self.batch_size * sharding.size(self.mesh)  # batch_size prompts per device
                for start in range(0, len(members), rows):
                    batch = members[start:start + rows]
                    result = generate(self.model, [ids[i] for i in batch], max_new_tokens=max_new, sampling=sampling,
                                      seed=start, kv=self.policy, dtype=self.dtype, kernels=self.backend,
                                      mesh=self.mesh)
                    for i, text in zip(batch, result.texts, strict=True):
                        cuts = [text.index(s) for s in until if s and s in text]
                        out[i] = text[:min(cuts)] if cuts else text
                    bar.update(len(batch))
        return out


def local_tasks(names: list[str], data_dir: str):
    """The harness's tasks by name; those in LOCAL_TASKS read the data folder's saved validation split
    (their only split there: evaluated on it, few-shot examples drawn from it), the rest as the
    harness loads them. -> list of lm_eval Task objects."""
    import datasets
    from lm_eval.tasks import TaskManager

    folders = {name: os.path.join(data_dir, "hf_datasets", TASKS[name][0]) for name in names if name in LOCAL_TASKS}
    for name, folder in folders.items():
        if not os.path.exists(os.path.join(folder, "state.json")):
            raise KvjaxError(f"{folder} not found: pass --data-dir (the shared data folder, see its MANIFEST.md)")
    manager = TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise KvjaxError(f"unknown harness task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them)")

    def from_disk(folder):
        def load(**_):
            rows = datasets.load_from_disk(folder)
            if "label" not in rows.column_names and "answer" in rows.column_names:  # boolq: google/boolq's columns
                rows = rows.map(lambda row: {"label": int(row["answer"])})
            return datasets.DatasetDict({"validation": rows})
        return load

    members = [{"task": n, "custom_dataset": from_disk(folders[n]), "training_split": None, "test_split": None}
               if n in folders else n for n in names]
    loaded = manager.load([{"group": "kvjax_local", "task": members}])["tasks"]  # name -> Task
    return [loaded[n] for n in names]
