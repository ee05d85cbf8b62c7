"""kvjax.kernels: the choice is resolved once into a backend, and every backend gives the same codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.errors import KvjaxError
from kvjax.kernels import Backend, Kernels, Native, Pallas, resolve
from pallas_kernels import cpu_attention
from pallas_kernels import quantize_pack as qp


def test_auto_resolves_by_platform():
    assert resolve("auto", "gpu") == Pallas()
    cpu = Kernels.NATIVE if cpu_attention.available() else Kernels.REFERENCE  # native where it compiles
    assert resolve(Kernels.AUTO, "cpu").kernels is cpu
    assert resolve("auto", "tpu") == Backend()  # compiled TPU kernels are untested
    assert resolve("interpret", "cpu") == Pallas(interpret=True)
    assert resolve("pallas", "tpu").kernels is Kernels.PALLAS
    assert resolve(resolve("reference")) == Backend()  # a backend is already resolved
    with pytest.raises(KvjaxError, match="GPU and TPU only"):
        resolve("pallas", "cpu")
    with pytest.raises(KvjaxError, match="on a CPU only"):
        resolve("native", "gpu")
    with pytest.raises(KvjaxError, match="unknown kernels"):
        resolve("triton")


def test_native_encodes_with_the_reference():
    assert Native().encoder("values") is qp.encode_values_reference


@pytest.mark.parametrize("kind, args", [("values", (4, 32, jnp.bfloat16)), ("key_groups", (2, 4, jnp.float32)),
                                        ("sym", (8, jnp.float32))])
def test_reference_and_interpreted_kernel_encode_alike(kind, args):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 8, 64)), jnp.float32)
    run = lambda backend: jax.jit(lambda v: backend.encoder(kind)(v, *args))(x)
    assert Backend().encoder(kind) is getattr(qp, f"encode_{kind}_reference")
    for a, b in zip(run(Backend()), run(Pallas(interpret=True))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
