"""kvjax: quantized KV caches for small Llama-family models in JAX."""

from kvjax.config import PRESETS, ModelConfig, get_preset
from kvjax.errors import KvjaxError
from kvjax.generation import GenerationResult, generate
from kvjax.loading import LoadedModel, load_model
from kvjax.model import Llama, forward, init_params
from kvjax.policies import POLICY_NAMES, PolicySpec, make_cache, parse_policy
from kvjax.sampling import SamplingConfig

__all__ = ["PRESETS", "ModelConfig", "get_preset", "KvjaxError", "GenerationResult", "generate",
           "LoadedModel", "load_model", "Llama", "forward", "init_params", "POLICY_NAMES", "PolicySpec", "make_cache", "parse_policy",
           "SamplingConfig"]
