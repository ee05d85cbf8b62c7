"""kvjax: quantized KV caches for small Llama-family models in JAX."""

from kvjax.config import PRESETS, ModelConfig, get_preset
from kvjax.errors import KvjaxError
from kvjax.generation import GenerationResult, estimate_memory, generate, prefill
from kvjax.kernels import Kernels
from kvjax.loading import LoadedModel, load_model
from kvjax.model import forward, init_params
from kvjax.policies import REGISTRY, Policy, get_policy, make_cache, policy_names
from kvjax.sampling import SamplingConfig
from kvjax.teacher_forced import score
from kvjax.weights import Weights

__all__ = ["PRESETS", "ModelConfig", "get_preset", "KvjaxError", "GenerationResult", "generate", "prefill",
           "estimate_memory", "Kernels", "Weights",
           "LoadedModel", "load_model", "forward", "init_params", "REGISTRY", "Policy", "get_policy", "make_cache",
           "policy_names", "SamplingConfig", "score"]
