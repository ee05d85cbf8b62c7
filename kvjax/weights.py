"""How a model's weight matrices are held and multiplied: the choice (`--weights`), resolved once.

A GGUF file stores the default model's matrices in llama.cpp's 4- and 8-bit block forms (~0.6 bytes
a weight); float32 holds the same values in 4 bytes, and a decode step reads every matrix once, so
at short context the step is the weights. `Weights` names the choice; `resolve` decides AUTO once
(before loading), and the loaded params carry it: a matrix kept in blocks is a `BlockMatrix`, a
pytree leaf of the params, that knows whether the C++ kernel multiplies it.

    FLOAT32  every matrix dequantized to float32 at load (the reference; every platform)
    NATIVE   matrices the file stores as Q4_0, Q4_1 or Q8_0 stay in those blocks, multiplied in place
             (pallas_kernels.block_matmul): the same values as FLOAT32, summed in float32 in another
             order; other matrices (a float checkpoint's, a GGUF's other types) as FLOAT32
    Q8_0     NATIVE, and every other matrix quantized to Q8_0 blocks at load (gguf's quantizer, as
             llama.cpp's): 8.5 bits a weight for a float checkpoint, its values rounded (WikiText-2
             perplexity +0.12% on a float32 copy of the default model: BENCHMARKS.md)
    AUTO     NATIVE on a CPU where the kernel builds, else FLOAT32 (GPU/TPU: unchanged)

Where the kernel does not run (GPU/TPU, no C++ compiler) a block matrix is dequantized with jnp
and multiplied by XLA, correct but no faster.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import memory
from kvjax.errors import KvjaxError
from pallas_kernels import block_matmul, cpu_attention
from pallas_kernels.block_matmul import Kind


class Weights(enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    NATIVE = "native"
    Q8_0 = "q8_0"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMatrix:
    """A matrix W [N, K] (or layers of them) in blocks of 32 along K: what x @ W^T multiplies.

    A float params leaf is [K, N] (a Dense kernel) or [N, K] (the embedding); a BlockMatrix is always
    rows of output features, as the file stores it."""

    blocks: jax.Array  # uint8 [(L,) N, K/32 * kind.block_bytes]
    kind: Kind = dataclasses.field(metadata=dict(static=True))
    kernel: bool = dataclasses.field(metadata=dict(static=True))  # multiplied by the C++ kernel

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """(L,) N, K: the shape of the float matrix it holds."""
        *lead, n, nbytes = self.blocks.shape
        return (*lead, n, nbytes // self.kind.block_bytes * block_matmul.BLOCK)


def resolve(weights: Weights | str = Weights.AUTO, platform: str | None = None, differentiable: bool = False) -> Weights:
    """The choice, AUTO decided: NATIVE on a CPU where the kernel builds, else FLOAT32. NATIVE or Q8_0
    elsewhere multiply through XLA (correct, not faster). `differentiable`: for a command that takes
    gradients through the model (the kernel has no transpose), AUTO is FLOAT32 and blocks are refused.
    Unknown names are a KvjaxError."""
    try:
        weights = Weights(weights)
    except ValueError:
        raise KvjaxError(f"unknown weights {weights!r}; known: {', '.join(w.value for w in Weights)}") from None
    if differentiable and weights not in (Weights.AUTO, Weights.FLOAT32):
        raise KvjaxError(f"--weights {weights.value}: this command differentiates through the model, which needs "
                         "float matrices (--weights float32)")
    if weights is Weights.AUTO:
        return Weights.NATIVE if not differentiable and uses_kernel(platform) else Weights.FLOAT32
    return weights


def uses_kernel(platform: str | None = None) -> bool:
    """Whether block matrices loaded now are multiplied by the C++ kernel (a CPU where it builds)."""
    return (platform or jax.default_backend()) == "cpu" and cpu_attention.available()


def linear(x, w, layer=None):
    """x [..., K] times a matrix: a float kernel [K, N] (already this layer's), or a BlockMatrix
    ([L, N, .] read at `layer`, or [N, .]) -> [..., N] in x's dtype (float32 sums)."""
    if not isinstance(w, BlockMatrix):
        return jnp.dot(x, w.astype(x.dtype))
    *lead, k = x.shape
    rows = x.reshape(-1, k).astype(jnp.float32)
    if w.kernel:
        y = block_matmul.matmul(rows, w.blocks, w.kind, layer=layer)
    else:
        y = block_matmul.matmul_reference(rows, w.blocks, w.kind, layer=layer)
    return y.reshape(*lead, -1).astype(x.dtype)


def take_rows(w: BlockMatrix, ids, dtype):
    """Rows `ids` int [...] of a [N, K] BlockMatrix (an embedding table) -> dtype [..., K]."""
    return block_matmul.dequantize(w.blocks[ids], w.kind).astype(dtype)


def split_layers(layers: dict):
    """(float leaves, block matrices) of a params["layers"] tree: the model slices the float leaves
    per layer and hands block matrices whole to the kernel, which reads the layer in place."""
    is_block = lambda a: isinstance(a, BlockMatrix)
    floats = {name: leaf for name, leaf in layers.items() if not is_block(leaf.get("kernel"))}
    blocks = {name: leaf["kernel"] for name, leaf in layers.items() if is_block(leaf.get("kernel"))}
    return floats, blocks


def quantize(w, kind: Kind):
    """float32 [N, K] -> uint8 blocks [N, K/32 * kind.block_bytes] (gguf's quantizer: llama.cpp's rounding)."""
    import gguf

    if w.shape[-1] % block_matmul.BLOCK:
        raise KvjaxError(f"{kind.name} weights need rows of a multiple of 32 values, not {w.shape[-1]}")
    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), gguf.GGMLQuantizationType[kind.name])


def as_blocks(params, matrices: Kind = Kind.Q4_1, table: Kind = Kind.Q8_0):
    """Float params (kvjax.model's tree) with every matrix quantized as the default model's file
    stores it (layers' matrices Q4_1, the embedding table and head Q8_0): random weights of a preset
    benchmarked as a GGUF would run."""
    kernel = uses_kernel()
    rows = lambda w: np.asarray(w, np.float32).swapaxes(-1, -2)  # a Dense kernel [.., K, N] -> rows [.., N, K]
    stack = lambda w, kind: np.stack([quantize(x, kind) for x in w]) if w.ndim == 3 else quantize(w, kind)
    out = dict(params)
    out["layers"] = {name: {"kernel": BlockMatrix(jnp.asarray(stack(rows(leaf["kernel"]), matrices)), matrices, kernel)}
                     if "kernel" in leaf else leaf for name, leaf in params["layers"].items()}
    out["embed"] = {"embedding": BlockMatrix(jnp.asarray(quantize(np.asarray(params["embed"]["embedding"]), table)),
                                             table, kernel)}
    if "lm_head" in params:
        out["lm_head"] = {"kernel": BlockMatrix(jnp.asarray(quantize(rows(params["lm_head"]["kernel"]), table)),
                                                table, kernel)}
    return out


def as_blocks_bytes(cfg, matrices: Kind = Kind.Q4_1, table: Kind = Kind.Q8_0, dtype=jnp.float32) -> int:
    """The bytes of `as_blocks`' params for `cfg` (the norms in `dtype`), from shapes alone."""
    d, v, l = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    norms, tables = (2 * l + 1) * d, (1 if cfg.tie_word_embeddings else 2) * v * d
    count = memory.parameter_bytes(cfg, jnp.float32) // 4 - norms - tables  # the layers' matrices
    return held_bytes(count, matrices) + held_bytes(tables, table) + held_bytes(norms, None, dtype)


def held_bytes(count: int, kind: Kind | None, dtype=jnp.float32) -> int:
    """Bytes of `count` weights held in blocks of `kind` (None: as `dtype`)."""
    return count * jnp.dtype(dtype).itemsize if kind is None else count // block_matmul.BLOCK * kind.block_bytes


def step_weight_bytes(params) -> int:
    """Bytes of the params a decode step reads: all of them, but for an untied embedding table (of
    which a step reads a row a token)."""
    read = {name: tree for name, tree in params.items() if name != "embed" or "lm_head" not in params}
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(read))
