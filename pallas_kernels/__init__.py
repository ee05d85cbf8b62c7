"""Pallas kernels for kvjax (GPU: Triton, TPU: Mosaic), each beside its pure-jnp reference.

quant: the quantization primitives (quantize/dequantize, pack/unpack) the references are built on.
quantize_pack: grouped asymmetric (KIVI keys per channel, values per token) and symmetric
    quantization + bit packing as one kernel each, their references, and the decoders.
decode_attention: fused decode attention over one packed KIVI tier, returning flash-decoding
    partials (o, m, l); `dense_partials` and `merge_partials` combine them with 16-bit parts.
cpu_attention (+ .cc): a layer's decode attention on a CPU, C++ through XLA's FFI.
cache_folder: where kvjax keeps what it builds ($KVJAX_CACHE), for cpu_attention and kvjax.cli.

This package imports nothing from kvjax: kvjax.kernels decides, once per cache, whether the
kernels or their references run. `python -m pallas_kernels.bench` times the attention kernel
against FP16 attention (BENCHMARKS.md).
"""
