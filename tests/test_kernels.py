"""kvjax.kernels: the kernels-or-reference choice is resolved once, and both give the same codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.errors import KvjaxError
from kvjax.kernels import Kernels, encoder, fused_attention, native_attention, resolve
from pallas_kernels import cpu_attention
from pallas_kernels import quantize_pack as qp


def test_auto_resolves_by_platform():
    assert resolve("auto", "gpu") is Kernels.PALLAS
    cpu = Kernels.NATIVE if cpu_attention.available() else Kernels.REFERENCE  # native where it compiles
    assert resolve(Kernels.AUTO, "cpu") is cpu
    assert resolve("auto", "tpu") is Kernels.REFERENCE  # compiled TPU kernels are untested
    assert resolve("interpret", "cpu") is Kernels.INTERPRET
    assert resolve("pallas", "tpu") is Kernels.PALLAS
    with pytest.raises(KvjaxError, match="GPU and TPU only"):
        resolve("pallas", "cpu")
    with pytest.raises(KvjaxError, match="on a CPU only"):
        resolve("native", "gpu")
    with pytest.raises(KvjaxError, match="unknown kernels"):
        resolve("triton")


def test_native_attends_natively_and_encodes_with_the_reference():
    assert native_attention(Kernels.NATIVE) and not native_attention(Kernels.REFERENCE)
    assert fused_attention(Kernels.NATIVE) is None
    assert encoder(Kernels.NATIVE, "values") is qp.encode_values_reference


def test_unresolved_choice_is_refused():
    with pytest.raises(ValueError, match="resolve"):
        encoder(Kernels.AUTO, "values")
    with pytest.raises(ValueError, match="resolve"):
        fused_attention(Kernels.AUTO)
    with pytest.raises(ValueError, match="resolve"):
        native_attention(Kernels.AUTO)


@pytest.mark.parametrize("kind, args", [("values", (4, 32, jnp.bfloat16)), ("key_groups", (2, 4, jnp.float32)),
                                        ("sym", (8, jnp.float32))])
def test_reference_and_interpreted_kernel_encode_alike(kind, args):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 8, 64)), jnp.float32)
    run = lambda kernels: jax.jit(lambda v: encoder(kernels, kind)(v, *args))(x)
    assert encoder(Kernels.REFERENCE, kind) is getattr(qp, f"encode_{kind}_reference")
    for a, b in zip(run(Kernels.REFERENCE), run(Kernels.INTERPRET)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
