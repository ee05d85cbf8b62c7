"""Model configurations: frozen dataclasses and named presets (Llama family).

The shape letters kvjax's docstrings use (b batch, n query heads, k kv heads, h head dim, ...) are
listed once, in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvjax.errors import KvjaxError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-architecture decoder (SmolLM family)."""

    name: str
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int  # f
    num_layers: int  # l
    num_heads: int  # n
    num_kv_heads: int  # k
    head_dim: int  # h
    rope_theta: float
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise KvjaxError(f"config {self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise KvjaxError(f"config {self.name}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise KvjaxError(f"config {self.name}: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads per kv head (g)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict, name: str = "hf") -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dict (LlamaForCausalLM)."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        model_type = hf.get("model_type", "llama")
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise KvjaxError(f"unsupported architecture {model_type!r} ({', '.join(archs)}); "
                             "kvjax supports the llama architecture")
        if hf.get("rope_scaling"):
            raise KvjaxError(f"unsupported rope_scaling {hf['rope_scaling']!r}: kvjax implements plain RoPE")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
                name=name,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads", heads),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos,
        )


def _smollm(name, d, f, layers, heads, kv_heads, theta, context):
    return ModelConfig(name=name, vocab_size=49152, hidden_size=d, intermediate_size=f,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=d // heads, rope_theta=theta, max_position_embeddings=context)


# Values from the published Hugging Face config.json of each checkpoint.
PRESETS: dict[str, ModelConfig] = {
    "SmolLM-135M": _smollm("SmolLM-135M", 576, 1536, 30, 9, 3, 10000.0, 2048),
    "SmolLM-360M": _smollm("SmolLM-360M", 960, 2560, 32, 15, 5, 10000.0, 2048),
    "SmolLM-1.7B": _smollm("SmolLM-1.7B", 2048, 8192, 24, 32, 32, 10000.0, 2048),
    "SmolLM2-135M": _smollm("SmolLM2-135M", 576, 1536, 30, 9, 3, 100000.0, 8192),
    "SmolLM2-360M": _smollm("SmolLM2-360M", 960, 2560, 32, 15, 5, 100000.0, 8192),
    "SmolLM2-1.7B": _smollm("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 130000.0, 8192),
    # Small enough for unit tests on a CPU; GQA with 2 query heads per kv head.
    "tiny": ModelConfig(name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        rope_theta=10000.0, max_position_embeddings=512),
}


def get_preset(name: str) -> ModelConfig:
    """Returns the named preset, or raises a KvjaxError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KvjaxError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
