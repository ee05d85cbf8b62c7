"""Shared fixtures: a small random Llama checkpoint written as a HF folder and as GGUF files.

The checkpoint is made here with numpy (HF tensor names, [out, in] weights) and written
the way the real converters write it: safetensors + config.json + tokenizer.json, and
GGUF with llama.cpp's Q/K row permutation. Loading tests compare what kvjax reads back.
"""

import dataclasses
import json
import os

import gguf
import jax
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, models, pre_tokenizers

from kvjax.config import get_preset
from kvjax.loading import permute_rotary

CFG = get_preset("tiny")
# The commands keep compiled programs on disk between runs (kvjax.cli.use_compilation_cache); the
# tests call them in-process, and compile afresh rather than read or fill a cache on disk.
jax.config.update("jax_enable_compilation_cache", False)
MAX_MEMORY_MAPS = 20000  # Linux allows a process 65530 (vm.max_map_count)


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
    """Frees jax's compiled programs once the process holds many memory maps.

    Every program XLA:CPU compiles keeps about three memory maps until it is freed; the whole suite
    compiles enough of them to pass Linux's limit, and the compile after that segfaults (seen at
    ~65k maps). Dropping jax's caches frees them; later tests recompile what they need.
    """
    yield
    if _memory_maps() > MAX_MEMORY_MAPS:
        jax.clear_caches()


def random_state_dict(cfg, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    norm = lambda: (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    sd = {"model.embed_tokens.weight": w(cfg.vocab_size, d), "model.norm.weight": norm()}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                   p + "self_attn.q_proj.weight": w(qd, d), p + "self_attn.k_proj.weight": w(kd, d),
                   p + "self_attn.v_proj.weight": w(kd, d), p + "self_attn.o_proj.weight": w(d, qd),
                   p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                   p + "mlp.down_proj.weight": w(d, f)})
    return sd


def byte_level_vocab(size: int) -> list[str]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return alphabet[:size]


def write_hf_folder(folder, cfg, sd):
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "model.safetensors"))
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
                 "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                 "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                 "num_key_value_heads": cfg.num_kv_heads, "rope_theta": cfg.rope_theta,
                 "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
                 "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(hf_config, fh)
    vocab = byte_level_vocab(cfg.vocab_size)
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_gguf(path, cfg, sd, qtype=gguf.GGMLQuantizationType.F32, arch="llama"):
    """Writes `sd` as llama.cpp's converter would: GGUF names, permuted Q/K rows, `qtype` matrices."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(byte_level_vocab(cfg.vocab_size))
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, x in sd.items():
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            gname = f"blk.{i}.{GGUF_NAMES[rest]}.weight"
        else:
            gname = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}[base] + ".weight"
        if rest_is(name, "q_proj"):
            x = permute_rotary(x, cfg.num_heads)
        elif rest_is(name, "k_proj"):
            x = permute_rotary(x, cfg.num_kv_heads)
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rest_is(name, proj):
    return name.endswith(f"self_attn.{proj}.weight")


@dataclasses.dataclass
class TinyCheckpoint:
    cfg: object
    state_dict: dict
    hf_folder: str
    gguf_f32: str
    gguf_q8_0: str


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    root = tmp_path_factory.mktemp("tiny_checkpoint")
    sd = random_state_dict(CFG)
    write_hf_folder(str(root / "hf"), CFG, sd)
    write_gguf(root / "tiny-f32.gguf", CFG, sd)
    write_gguf(root / "tiny-q8_0.gguf", CFG, sd, gguf.GGMLQuantizationType.Q8_0)
    return TinyCheckpoint(CFG, sd, str(root / "hf"), str(root / "tiny-f32.gguf"), str(root / "tiny-q8_0.gguf"))
