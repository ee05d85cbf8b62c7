"""Fused quantize + pack kernels (pallas_kernels.quantize_pack) against their pure-jnp references.

On CPU the kernels run in the Pallas interpreter (and a few cases in the TPU interpreter); with
a GPU/TPU they run compiled. Codes must match the references bit for bit, and scales/zeros exactly
(same float32 operations). Inputs are random, never all zeros: keys get per-channel offsets and
spreads like real keys, and some groups are constant (scale 0). Shapes: lead the leading dims,
c tokens, h head dim, G group size, BR block rows (small, so grids have several blocks and the
row count is not a multiple of BR).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import quantize_pack as qp
from pallas_kernels.quantize_pack import PackBlocks, encode_key_groups, encode_sym, encode_values

BACKEND = jax.default_backend()
INTERPRET = BACKEND == "cpu"  # elsewhere: compiled (Triton on GPU, Mosaic on TPU)
BF16, F32 = jnp.bfloat16, jnp.float32

# Jitted, as the caches run them: XLA turns the division by the constant 2**bits - 1 into a
# multiplication, in jitted code only, and the kernels multiply.
encode_values_reference = jax.jit(qp.encode_values_reference, static_argnums=(1, 2, 3))
encode_key_groups_reference = jax.jit(qp.encode_key_groups_reference, static_argnums=(1, 2, 3))
encode_sym_reference = jax.jit(qp.encode_sym_reference, static_argnums=(1, 2))
decode_values = jax.jit(qp.decode_values, static_argnums=(3, 4, 5))
decode_key_groups = jax.jit(qp.decode_key_groups, static_argnums=(3, 4, 5))
decode_sym = jax.jit(qp.decode_sym, static_argnums=(2, 3))


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]
    c: int
    h: int
    bits: int
    G: int = 32
    x_dtype: object = F32
    scale_dtype: object = F32
    BR: int = 8

    def __str__(self):
        lead = "x".join(map(str, self.lead)) or "none"
        return (f"lead{lead}-c{self.c}-h{self.h}-bits{self.bits}-G{self.G}-BR{self.BR}"
                f"-{jnp.dtype(self.x_dtype).name}-{jnp.dtype(self.scale_dtype).name}")


def random_x(seed, shape, dtype, kind: str, G: int):
    """Random [..., c, h] input; some groups constant (scale 0), keys with channel offsets/spreads."""
    rng = np.random.default_rng(seed)
    *lead, c, h = shape
    if kind == "keys":
        offset = rng.normal(0.0, 2.0, (h,))
        spread = rng.uniform(0.05, 4.0, (h,))  # a few wide channels, as real keys have
        x = offset + spread * rng.standard_normal(shape)
        flat = x.reshape(-1, h)
        flat[:G, 1] = 0.75  # one constant key group of channel 1
        flat[:G, 2] = offset[2]
    else:
        x = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, (*lead, c, 1))  # per-token spreads
        flat = x.reshape(-1, h)
        flat[0, :G] = -1.25  # one constant value group (a whole row for sym: all equal, not zero)
        if kind == "sym" and flat.shape[0] > 1:
            flat[1] = 0.0  # one all-zero token: max|x| = 0
    return jnp.asarray(x, jnp.float32).astype(dtype)


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
        np.testing.assert_array_equal(np.asarray(a.astype(F32) if a.dtype != jnp.uint32 else a),
                                      np.asarray(e.astype(F32) if e.dtype != jnp.uint32 else e))


def assert_round_trip(x, decoded, scale_bound):
    """|x - decode(encode(x))| <= scale / 2 (plus the 16-bit rounding of scale/zero and output)."""
    err = np.abs(np.asarray(decoded, np.float32) - np.asarray(x.astype(F32)))
    bound = np.asarray(scale_bound, np.float32)
    tol = 0.02 * np.max(np.abs(np.asarray(x.astype(F32))))  # bf16 scale/zero rounding
    assert np.all(err <= 0.5 * bound + tol), float(np.max(err - 0.5 * bound))


VALUE_CASES = [
    Case((), 5, 64, 4),
    Case((2, 3), 7, 64, 2, G=32, x_dtype=BF16, scale_dtype=BF16),
    Case((3,), 9, 64, 8, G=4),
    Case((1, 2), 11, 64, 4, G=4, x_dtype=BF16, scale_dtype=F32),
    Case((2,), 16, 32, 2, G=4, scale_dtype=BF16, BR=16),
    Case((2, 2), 13, 128, 8, G=32, x_dtype=BF16, scale_dtype=BF16, BR=16),
    Case((4,), 3, 64, 4, G=32, BR=128),  # one block, fewer rows than BR
]

KEY_CASES = [
    Case((), 8, 64, 4, G=4),
    Case((2, 3), 32, 64, 2, G=32, x_dtype=BF16, scale_dtype=BF16, BR=32),
    Case((3,), 12, 64, 8, G=4, x_dtype=BF16),  # 36 rows, BR 8: padded to 40
    Case((1, 2), 64, 64, 4, G=32, scale_dtype=BF16),  # BR raised to G
    Case((5,), 4, 32, 2, G=4, x_dtype=BF16, scale_dtype=F32, BR=16),  # 20 rows, BR 16
    Case((2,), 32, 128, 8, G=32, BR=128),
]

SYM_CASES = [
    Case((), 5, 64, 8),
    Case((2, 3), 7, 64, 4, x_dtype=BF16, scale_dtype=BF16),
    Case((3,), 9, 32, 2),
    Case((2, 2), 6, 128, 8, x_dtype=BF16, scale_dtype=F32, BR=16),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=str)
def test_values_match_reference(case):
    v = random_x(1, (*case.lead, case.c, case.h), case.x_dtype, "values", case.G)
    got = encode_values(v, case.bits, case.G, case.scale_dtype, blocks=PackBlocks(case.BR),
                               interpret=INTERPRET)
    assert_same(got, encode_values_reference(v, case.bits, case.G, case.scale_dtype))
    codes, scale, zero = got
    decoded = decode_values(codes, scale, zero, case.bits, case.G, F32)
    assert_round_trip(v, decoded, jnp.repeat(scale.astype(F32), case.G, axis=-1))


@pytest.mark.parametrize("case", KEY_CASES, ids=str)
def test_keys_match_reference(case):
    k = random_x(2, (*case.lead, case.c, case.h), case.x_dtype, "keys", case.G)
    got = encode_key_groups(k, case.bits, case.G, case.scale_dtype, blocks=PackBlocks(case.BR),
                                   interpret=INTERPRET)
    assert_same(got, encode_key_groups_reference(k, case.bits, case.G, case.scale_dtype))
    codes, scale, zero = got
    assert np.any(np.asarray(scale) == 0)  # the constant group
    decoded = decode_key_groups(codes, scale, zero, case.bits, case.G, F32)
    assert_round_trip(k, decoded, jnp.repeat(scale.astype(F32), case.G, axis=-2))


@pytest.mark.parametrize("case", SYM_CASES, ids=str)
def test_sym_matches_reference(case):
    x = random_x(3, (*case.lead, case.c, case.h), case.x_dtype, "sym", 1)
    got = encode_sym(x, case.bits, case.scale_dtype, blocks=PackBlocks(case.BR), interpret=INTERPRET)
    assert_same(got, encode_sym_reference(x, case.bits, case.scale_dtype))
    codes, scale = got
    decoded = decode_sym(codes, scale, case.bits, F32)
    assert_round_trip(x, decoded, scale.astype(F32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_half_to_even(bits):
    """Quotients exactly k + 0.5 round to the even neighbour, as jnp.round does."""
    qmax = 2**bits - 1
    G = 32
    ramp = np.concatenate([[0.0, float(qmax)], np.arange(G - 2) % qmax + 0.5])  # scale 1, zero 0
    rows = np.stack([ramp, ramp * 0.25 - 3.0])  # scale 0.25 (exact), zero -3
    v = jnp.asarray(np.concatenate([rows, rows], axis=1)[None], F32)  # [1, 2, 64]
    got = encode_values(v, bits, G, F32, interpret=INTERPRET)
    assert_same(got, encode_values_reference(v, bits, G, F32))
    codes = np.asarray(jax.device_get(got[0]))
    word0 = int(codes[0, 0, 0])
    assert word0 & (2**bits - 1) == 0 and (word0 >> bits) & (2**bits - 1) == qmax
    if bits == 8:  # third code: 0.5 -> 0, fourth: 1.5 -> 2
        assert (word0 >> 16) & 255 == 0 and (word0 >> 24) & 255 == 2


@pytest.mark.skipif(BACKEND != "cpu", reason="the TPU interpreter runs on CPU")
@pytest.mark.parametrize("kind", ["values", "keys", "sym"])
def test_tpu_interpreter(kind):
    """The kernels under the TPU interpreter (TPU block constraints: keys' BR raised to 8 * G)."""
    params = pltpu.InterpretParams()
    x = random_x(4, (3, 16, 64), BF16, kind, 4)
    if kind == "values":
        got = encode_values(x, 4, 4, BF16, blocks=PackBlocks(8), interpret=params)
        want = encode_values_reference(x, 4, 4, BF16)
    elif kind == "keys":
        got = encode_key_groups(x, 2, 4, F32, blocks=PackBlocks(8), interpret=params)  # BR 32, 48 rows
        want = encode_key_groups_reference(x, 2, 4, F32)
    else:
        got = encode_sym(x, 8, BF16, blocks=PackBlocks(16), interpret=params)
        want = encode_sym_reference(x, 8, BF16)
    assert_same(got, want)


@pytest.mark.skipif(BACKEND == "gpu", reason="Triton needs a power-of-two head_dim (see the next test)")
def test_non_power_of_two_head_dim():
    x = random_x(8, (2, 8, 48), F32, "values", 4)
    assert_same(encode_key_groups(x, 4, 4, F32, interpret=INTERPRET),
                encode_key_groups_reference(x, 4, 4, F32))


@pytest.mark.skipif(BACKEND != "gpu", reason="Triton-only constraint")
def test_triton_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        encode_values(jnp.ones((2, 4, 48), F32), 4, 16, F32)
    with pytest.raises(ValueError, match="power-of-two group_size"):
        encode_key_groups(jnp.ones((2, 24, 64), F32), 4, 24, F32)


def test_empty_rows():
    codes, scale, zero = encode_values(jnp.ones((2, 0, 64), BF16), 4, 32, BF16, interpret=INTERPRET)
    assert codes.shape == (2, 0, 8) and scale.shape == zero.shape == (2, 0, 2) and scale.dtype == BF16


@pytest.mark.parametrize("call, message", [
    (lambda: encode_values(jnp.ones((64,)), 4, 32, F32, interpret=True), r"\[\.\.\., c, h\]"),
    (lambda: encode_values(jnp.ones((2, 64)), 3, 32, F32, interpret=True), "bits must be one of"),
    (lambda: encode_values(jnp.ones((2, 64)), 4, 24, F32, interpret=True), "divisible by group_size=24"),
    (lambda: encode_values(jnp.ones((2, 64)), 4, 0, F32, interpret=True), "positive int"),
    (lambda: encode_key_groups(jnp.ones((2, 6, 64)), 4, 4, F32, interpret=True),
     r"tokens \(axis -2\) divisible by group_size=4"),
    (lambda: encode_sym(jnp.ones((2, 24)), 2, F32, interpret=True), "multiple of 16"),
    (lambda: encode_sym(jnp.ones((2, 64), jnp.int32), 8, F32, interpret=True), "floating point"),
    (lambda: PackBlocks(block_rows=12), "power of two >= 8"),
    (lambda: PackBlocks(num_warps=0), "positive int"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(BACKEND != "cpu", reason="CPU has no compiled Pallas path")
def test_cpu_kernel_without_interpret_raises():
    with pytest.raises(ValueError, match="interpret=True"):
        encode_sym(jnp.ones((2, 64)), 8, F32)
