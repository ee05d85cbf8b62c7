"""Pallas kernels for kvjax (GPU: Triton, TPU: Mosaic TPU), each beside its pure-jnp reference.

decode_attention: fused decode attention over one KIVI packed tier (issue #4). The kernel reads
    bit-packed codes, dequantizes in registers and returns flash-decoding partials (o, m, l);
    `merge_partials` combines the partials of several tiers and of 16-bit parts
    (`dense_partials`) into the softmax over their union. `tier_attention_partials` runs the
    jnp reference on CPU and the kernel on GPU/TPU (interpret=True: the Pallas interpreter).

quantize_pack: grouped asymmetric (KIVI keys per channel, values per token) and symmetric
    quantization + bit packing, bit-identical to kvjax.codecs (`encode_values`,
    `encode_key_groups`, `encode_sym`: the codecs on CPU, the kernel on GPU/TPU).

kvjax.tiered.TieredCache writes through quantize_pack and attends through decode_attention on GPU
(`TieredCache.kernels`); `python -m pallas_kernels.bench` times the attention kernel against FP16
attention (BENCHMARKS.md).
"""

from pallas_kernels.decode_attention import (
    EMPTY_MAX,
    DecodeBlocks,
    Partials,
    dense_partials,
    merge_partials,
    tier_attention_partials,
    tier_attention_partials_kernel,
    tier_attention_partials_reference,
)
from pallas_kernels.quantize_pack import encode_key_groups, encode_sym, encode_values

__all__ = [
    "EMPTY_MAX",
    "encode_key_groups",
    "encode_sym",
    "encode_values",
    "DecodeBlocks",
    "Partials",
    "dense_partials",
    "merge_partials",
    "tier_attention_partials",
    "tier_attention_partials_kernel",
    "tier_attention_partials_reference",
]
