"""The learned precision controller ("Don't Waste Bits!"): token features -> a width in {2, 4, 8, 16}.

A small MLP (6 inputs -> 128 -> 128 -> 4 logits) over the features of kvjax.features, with the
token id replaced by its corpus rarity -log((c + 1) / (N + |V| + 1)) from a frequency table
that ships with the controller. A leaving token's preferred width is

    argmax_w  logits_w(normalized inputs) - bias * w

where `bias` was set after training so that the held-out average is the budget. Training
lives in `train_controller/`; this module is the inference side and the file format.

The controller file is one compressed .npz (a few hundred KB at most): the MLP params, the
input normalization, the frequency table, the budget, the held-out width histogram (which
sizes the tiers, see PolicySpec.histogram), the input names and the model shape it was
trained for. An .npz needs only numpy to read, is one file (package data), and is checked
field by field here; Orbax is used for the training checkpoints, which must resume.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import KvjaxError
from kvjax.shipped import shipped_budgets, shipped_file
from kvjax.features import FEATURE_NAMES
from kvjax.layout import WIDTHS

FORMAT_VERSION = 1
# What the MLP reads, in order (kvjax.features names; `corpus_rarity` comes from `token`).
# Not `position`: traces are 1024-token chunks, and a controller that read it extrapolated to
# positions up to 4096 by moving most tokens to 4 bits (measured: 86% at position 4000 instead
# of the 50% budgeted), which the tier capacities then cut off by arrival order.
INPUTS = ("entropy", "confidence", "corpus_rarity", "key_norm", "value_norm", "head_var")
DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "controllers")
SHIPPED_ENDING = ".npz"  # smollm2-135m-instruct-3bits.npz


class ControllerMLP(nn.Module):
    hidden: Sequence[int] = (128, 128)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden):
            x = nn.gelu(nn.Dense(width, name=f"hidden_{i}")(x))
        return nn.Dense(len(WIDTHS), name="out")(x)


def corpus_rarity(counts: np.ndarray) -> np.ndarray:
    """Token counts [V] -> -log((c + 1) / (N + |V| + 1)) [V] (add-one smoothed surprisal)."""
    counts = np.asarray(counts, np.float64)
    return (-np.log((counts + 1.0) / (counts.sum() + counts.size + 1.0))).astype(np.float32)


def controller_inputs(features, rarity_table):
    """features [..., F] (kvjax.features order) -> the MLP's raw inputs [..., len(INPUTS)]."""
    col = lambda name: features[..., FEATURE_NAMES.index(name)]
    token = jnp.clip(col("token").astype(jnp.int32), 0, rarity_table.shape[0] - 1)
    named = {"corpus_rarity": jnp.asarray(rarity_table)[token]}
    return jnp.stack([named[n] if n in named else col(n) for n in INPUTS], axis=-1)


def controller_logits(params, hidden, mean, std, rarity_table, features):
    """Logits over WIDTHS [..., 4] from raw features [..., F]."""
    x = (controller_inputs(features, rarity_table) - mean) / std
    return ControllerMLP(tuple(hidden)).apply({"params": params}, x)


@dataclasses.dataclass(frozen=True, eq=False)
class Controller:
    """A trained controller (static under jit: equal and hashed by the digest of its contents)."""

    params: dict  # Flax params of ControllerMLP, numpy arrays
    hidden: tuple[int, ...]
    mean: np.ndarray  # [len(INPUTS)] input normalization
    std: np.ndarray
    counts: np.ndarray  # int32 [V]: the token-frequency table
    budget_bits: float
    histogram: dict  # width -> held-out share of left tokens
    bias: float  # subtracted per bit from the logits (set to meet the budget)
    model: dict  # vocab_size, num_layers, hidden_size, num_kv_heads of the model it was trained for
    info: dict = dataclasses.field(default_factory=dict)  # training summary (free-form)

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(self.params) + [self.mean, self.std]:
            h.update(np.ascontiguousarray(leaf, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.counts, np.int32).tobytes())
        h.update(json.dumps([self.hidden, self.budget_bits, self.bias, self.model], sort_keys=True).encode())
        return h.hexdigest()

    def __eq__(self, other):
        return isinstance(other, Controller) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)

    @property
    def rarity(self) -> np.ndarray:
        return corpus_rarity(self.counts)

    def logits(self, features):
        return controller_logits(self.params, self.hidden, self.mean, self.std, self.rarity, features)

    def widths(self, features):
        """Preferred widths int32 [...] of tokens with features [..., F]."""
        return choose_widths(self.logits(features), self.bias)

    def check(self, cfg):
        for key, want in self.model.items():
            if getattr(cfg, key) != want:
                raise KvjaxError(f"the controller was trained for a model with {key}={want}, this model has "
                                 f"{getattr(cfg, key)}; train one for it with python -m train_controller")


def choose_widths(logits, bias):
    """argmax_w logits_w - bias * w -> widths int32 [...]."""
    widths = jnp.asarray(WIDTHS, jnp.float32)
    return jnp.asarray(WIDTHS, jnp.int32)[jnp.argmax(logits - bias * widths, axis=-1)]


def model_signature(cfg) -> dict:
    return {"vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "num_kv_heads": cfg.num_kv_heads}


def save_controller(path: str, ctrl: Controller):
    flat = {f"params/{'/'.join(str(getattr(k, 'key', k)) for k in keypath)}": np.asarray(leaf)
            for keypath, leaf in jax.tree_util.tree_flatten_with_path(ctrl.params)[0]}
    meta = {"format": FORMAT_VERSION, "inputs": list(INPUTS), "hidden": list(ctrl.hidden),
            "budget_bits": ctrl.budget_bits, "histogram": {str(w): s for w, s in ctrl.histogram.items()},
            "bias": ctrl.bias, "model": ctrl.model, "info": ctrl.info}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, meta=np.asarray(json.dumps(meta)), mean=np.asarray(ctrl.mean, np.float32),
                            std=np.asarray(ctrl.std, np.float32), counts=np.asarray(ctrl.counts, np.int32),
                            **flat)


def load_controller(path: str) -> Controller:
    """Reads a controller file; a missing, damaged or mismatched file raises one clear KvjaxError."""
    if not os.path.isfile(path):
        raise KvjaxError(f"controller file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:  # zip, npy or json damage
        raise KvjaxError(f"controller file {path} is damaged ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT_VERSION or meta.get("inputs") != list(INPUTS):
        raise KvjaxError(f"controller file {path} has format {meta.get('format')} with inputs {meta.get('inputs')}; "
                         f"this kvjax reads format {FORMAT_VERSION} with inputs {list(INPUTS)}")
    try:
        params: dict = {}
        for key in [k for k in arrays if k.startswith("params/")]:
            node = params
            *parents, leaf = key.split("/")[1:]
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = arrays.pop(key)
        hidden = tuple(int(h) for h in meta["hidden"])
        ctrl = Controller(params=params, hidden=hidden, mean=arrays["mean"], std=arrays["std"],
                          counts=arrays["counts"], budget_bits=float(meta["budget_bits"]),
                          histogram={int(w): float(s) for w, s in meta["histogram"].items()},
                          bias=float(meta["bias"]), model=dict(meta["model"]), info=meta.get("info", {}))
        shapes = jax.eval_shape(lambda: ControllerMLP(hidden).init(jax.random.PRNGKey(0),
                                                                  jnp.zeros((1, len(INPUTS)))))["params"]
        if jax.tree_util.tree_structure(shapes) != jax.tree_util.tree_structure(params) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(shapes),
                                                    jax.tree_util.tree_leaves(params))):
            raise ValueError("params do not match the MLP shape")
        if ctrl.mean.shape != (len(INPUTS),) or ctrl.std.shape != (len(INPUTS),):
            raise ValueError("normalization has the wrong shape")
        if sorted(ctrl.histogram) != list(WIDTHS) or abs(sum(ctrl.histogram.values()) - 1) > 1e-3:
            raise ValueError(f"bad histogram {ctrl.histogram}")
    except (KeyError, ValueError, TypeError) as e:
        raise KvjaxError(f"controller file {path} is malformed: {e}") from None
    return ctrl


def shipped_controller_budgets() -> str:
    """The budgets a controller is shipped for, ascending: "2.5, 3, 4"."""
    return shipped_budgets(DEFAULT_DIR, SHIPPED_ENDING)


def default_controller(budget_bits: float) -> Controller:
    """The controller shipped for the default model at this budget."""
    return load_controller(shipped_file(DEFAULT_DIR, budget_bits, SHIPPED_ENDING, "controller",
                                        "train one with python -m train_controller and pass --controller"))
