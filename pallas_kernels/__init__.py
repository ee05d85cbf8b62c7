"""Pallas kernels for kvjax (GPU: Triton / Mosaic GPU, TPU: Mosaic TPU).

Planned (issue #4): grouped quantize + pack, and fused mixed-precision decode attention,
each beside its pure-jnp reference in kvjax. Nothing is implemented here yet; kvjax runs
its jnp reference path on every backend.
"""
