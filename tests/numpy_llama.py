"""An independent float64 NumPy Llama forward over a HF state dict (the test reference).

Written from the HF `modeling_llama` equations, sharing no code with kvjax.model.
"""

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(sd: dict, cfg, tokens: np.ndarray) -> np.ndarray:
    """tokens [t] -> logits [t, v] for one sequence, positions 0..t-1."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    t, hd = len(tokens), cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    freqs = np.outer(np.arange(t), inv_freq)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
    causal = np.tril(np.ones((t, t), bool))
    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).reshape(t, cfg.num_heads, hd).transpose(1, 0, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(t, -1)
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["model.embed_tokens.weight"].T
