"""Pallas kernels for kvjax (GPU: Triton, TPU: Mosaic TPU), each beside its pure-jnp reference.

decode_attention: fused decode attention over one KIVI packed tier (issue #4). The kernel reads
    bit-packed codes, dequantizes in registers and returns flash-decoding partials (o, m, l);
    `merge_partials` combines the partials of several tiers and of 16-bit parts
    (`dense_partials`) into the softmax over their union. `tier_attention_partials` runs the
    jnp reference on CPU and the kernel on GPU/TPU (interpret=True: the Pallas interpreter).

Planned: grouped quantize + pack.
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

__all__ = [
    "EMPTY_MAX",
    "DecodeBlocks",
    "Partials",
    "dense_partials",
    "merge_partials",
    "tier_attention_partials",
    "tier_attention_partials_kernel",
    "tier_attention_partials_reference",
]
