"""How one side (keys or values) of one tier is stored, for the layers of one segment.

  Dense       16 bits as is                  x      [l, b, k, c, h]
  KiviKeys    KIVI keys: per channel, in     codes  uint32 [l, b, k, c, h * bits / 32]
              groups of G slots; a group's   scale, zero [l, b, k, c / G, h]
              keys wait in the 16-bit stage  stage  [l, b, k, G, h]
              until it is full
  KiviValues  KIVI values: per token, in     codes  uint32 [l, b, k, c, h * bits / 32]
              groups of G channels           scale, zero [l, b, k, c, h / G]
  Symmetric   per token, over the head dim   codes  uint32 [l, b, k, c, h * bits / 32], scale [l, b, k, c, 1]

Every store has the same small interface, which the step-by-step cache (kvjax.tiered) uses:
`write` one token per row, `write_group` / `read_group` a whole group of G slots (demotion),
`scores` (a keys store: q . every slot's key) or `mix` (a values store: the probability-weighted
sum of its values), both straight from the packed codes (pallas_kernels.decode_attention), and
`fill` from a sequence's tokens placed at their slots (prompts). `roundtrip` is what reading stored tokens back gives (KIVI keys: given in slot order,
whole groups), which the teacher-forced path (kvjax.teacher_forced) uses to score exactly. Codes come from the encoders that
kvjax.kernels picks (Pallas kernel or reference, bit-identical); decoders are pure jnp.
`layer` is the index within the segment; slots out of range are not written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import kernels as kernel_choice
from pallas_kernels import decode_attention as da
from pallas_kernels import quantize_pack as qp


def _put(array, layer, index, values):
    """array[layer][index] = values (out-of-range indices dropped).

    Scattering into the one layer's slice and writing that slice back lets XLA update the
    cache in place; a scatter into the whole [l, ...] array copied it on every step.
    """
    return array.at[layer].set(array[layer].at[index].set(values, mode="drop"))


def _group_slots(rows, start, g):
    return rows[:, None], slice(None), start[:, None] + jnp.arange(g)  # [b, G] slots from start [b]


def _take_group(x, layer, start, g):
    """x[layer] at the G slots from start [b] -> [b, k, G, ...] (start clamped inside)."""
    c = x.shape[3]
    rows = jnp.arange(start.shape[0])[:, None]
    slots = jnp.minimum(start[:, None] + jnp.arange(g), c - 1)
    return x[layer][rows, :, slots].swapaxes(1, 2)  # [b, G, k, ...] -> [b, k, G, ...]


def _by_slot(x):
    return x.swapaxes(1, 2)  # [b, k, G, ...] -> [b, G, k, ...]: the layout of a scatter at [rows, :, slots]


class _Raw:
    """Copying a group's stored arrays as they are (a demotion between tiers of the same widths).

    SLOTS names the fields with one entry per slot, GROUPS those with one per group of G slots."""

    SLOTS: tuple[str, ...] = ()
    GROUPS: tuple[str, ...] = ()

    def take_raw(self, layer, start, g):
        raw = {f: _take_group(getattr(self, f), layer, start, g) for f in self.SLOTS}
        group = jnp.minimum(start // g, getattr(self, self.SLOTS[0]).shape[3] // g - 1)
        raw.update({f: getattr(self, f)[layer][jnp.arange(start.shape[0]), :, group] for f in self.GROUPS})
        return raw

    def put_raw(self, layer, rows, start, raw):
        g = raw[self.SLOTS[0]].shape[2]
        c = getattr(self, self.SLOTS[0]).shape[3]
        out = {f: _put(getattr(self, f), layer, _group_slots(rows, start, g), _by_slot(raw[f])) for f in self.SLOTS}
        group = (rows, slice(None), jnp.where(start < c, start // g, c // g))
        out.update({f: _put(getattr(self, f), layer, group, raw[f]) for f in self.GROUPS})
        return self.replace(**out)


@struct.dataclass
class Dense(_Raw):
    x: jax.Array  # [l, b, k, c, h]
    SLOTS = ("x",)

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        return cls(jnp.zeros(shape, dtype))

    @property
    def slots(self) -> int:
        return self.x.shape[3]

    def write(self, layer, rows, slot, x, kernels):
        return self.replace(x=_put(self.x, layer, (rows, slice(None), slot), x.astype(self.x.dtype)))

    def write_group(self, layer, rows, start, x, kernels):
        return self.replace(x=_put(self.x, layer, _group_slots(rows, start, x.shape[2]), _by_slot(x).astype(self.x.dtype)))

    def read_group(self, layer, start, g, dtype):
        return _take_group(self.x, layer, start, g).astype(dtype)

    def scores(self, layer, q, stage_start=None, staged=None):
        return da.dense_scores(q, self.x[layer])

    def mix(self, layer, p):
        return da.dense_mix(p, self.x[layer])

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, stage_start=None):
        return cls(placed)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return x


@struct.dataclass
class KiviValues(_Raw):
    codes: jax.Array  # uint32 [l, b, k, c, w]
    scale: jax.Array  # [l, b, k, c, h / G]
    zero: jax.Array
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    SLOTS = ("codes", "scale", "zero")

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        side = jnp.zeros((l, b, k, c, h // group_size), dtype)
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), side, side, bits, group_size)

    @property
    def slots(self) -> int:
        return self.codes.shape[3]

    def _encode(self, x, kernels):
        return kernel_choice.encoder(kernels, "values")(x, self.bits, self.group_size, self.scale.dtype)

    def write(self, layer, rows, slot, x, kernels):
        """x [b, k, h] at slot [b]."""
        codes, scale, zero = (a[:, :, 0] for a in self._encode(x[:, :, None], kernels))
        at = (rows, slice(None), slot)
        return self.replace(codes=_put(self.codes, layer, at, codes), scale=_put(self.scale, layer, at, scale),
                            zero=_put(self.zero, layer, at, zero))

    def write_group(self, layer, rows, start, x, kernels):
        """x [b, k, G, h] at the G slots from start [b]."""
        codes, scale, zero = self._encode(x, kernels)
        at = _group_slots(rows, start, x.shape[2])
        return self.replace(codes=_put(self.codes, layer, at, _by_slot(codes)),
                            scale=_put(self.scale, layer, at, _by_slot(scale)),
                            zero=_put(self.zero, layer, at, _by_slot(zero)))

    def read_group(self, layer, start, g, dtype):
        take = lambda a: _take_group(a, layer, start, g)
        return qp.decode_values(take(self.codes), take(self.scale), take(self.zero), self.bits, self.group_size, dtype)

    def mix(self, layer, p):
        return da.kivi_value_mix(p, self.codes[layer], self.scale[layer], self.zero[layer], bits=self.bits,
                                 group_size=self.group_size)

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, stage_start=None):
        codes, scale, zero = kernel_choice.encoder(kernels, "values")(placed, bits, group_size, placed.dtype)
        return cls(codes, scale, zero, bits, group_size)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return qp.decode_values(*qp.encode_values_reference(x, bits, group_size, dtype), bits, group_size, dtype)


@struct.dataclass
class KiviKeys(_Raw):
    codes: jax.Array  # uint32 [l, b, k, c, w]
    scale: jax.Array  # [l, b, k, c / G, h]
    zero: jax.Array
    stage: jax.Array  # [l, b, k, G, h]: the 16-bit keys of the group being filled
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    SLOTS = ("codes",)
    GROUPS = ("scale", "zero")

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        side = jnp.zeros((l, b, k, c // group_size, h), dtype)
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), side, side,
                   jnp.zeros((l, b, k, group_size if c else 0, h), dtype), bits, group_size)

    @property
    def slots(self) -> int:
        return self.codes.shape[3]

    def _encode(self, x, kernels):
        return kernel_choice.encoder(kernels, "key_groups")(x, self.bits, self.group_size, self.scale.dtype)

    def _store_group(self, layer, rows, start, codes, scale, zero, inside):
        """Codes [b, k, G, w] and scale/zero [b, k, 1, h] of whole groups starting at start [b] where inside [b]."""
        g = self.group_size
        slots = _group_slots(rows, jnp.where(inside, start, self.slots), g)
        group = (rows, slice(None), jnp.where(inside, start // g, self.slots // g))
        return self.replace(codes=_put(self.codes, layer, slots, _by_slot(codes)),
                            scale=_put(self.scale, layer, group, scale[:, :, 0]),
                            zero=_put(self.zero, layer, group, zero[:, :, 0]))

    def write(self, layer, rows, slot, x, kernels):
        """x [b, k, h] at slot [b]: into the stage; the group's last slot encodes the whole group."""
        g = self.group_size
        inside = slot < self.slots
        stage = _put(self.stage, layer, (rows, slice(None), jnp.where(inside, slot % g, g)), x.astype(self.stage.dtype))
        done = self.replace(stage=stage)
        codes, scale, zero = self._encode(stage[layer], kernels)  # [b, k, G, w], [b, k, 1, h]
        complete = inside & (slot % g == g - 1)
        return done._store_group(layer, rows, slot - g + 1, codes, scale, zero, complete)

    def write_group(self, layer, rows, start, x, kernels):
        codes, scale, zero = self._encode(x, kernels)
        return self._store_group(layer, rows, start, codes, scale, zero, start < self.slots)

    def read_group(self, layer, start, g, dtype):
        """Keys [b, k, G, h] of the complete group at slots start.. (start [b])."""
        group = jnp.minimum(start // g, self.slots // g - 1)
        side = lambda a: a[layer][jnp.arange(start.shape[0]), :, group][:, :, None]  # [b, k, 1, h]
        return qp.decode_key_groups(_take_group(self.codes, layer, start, g), side(self.scale), side(self.zero),
                                    self.bits, g, dtype)

    def scores(self, layer, q, stage_start, staged):
        """q [b, k, g, h] . every slot's key [b, k, g, c]; the `staged` [b] slots from stage_start [b] are
        read from the 16-bit stage (their group is not complete)."""
        g = self.group_size
        packed = da.kivi_key_scores(q, self.codes[layer], self.scale[layer], self.zero[layer], bits=self.bits,
                                    group_size=g)
        stage = jnp.tile(da.dense_scores(q, self.stage[layer]), (1, 1, 1, self.slots // g))  # slot s -> stage s % G
        slot = jnp.arange(self.slots)
        in_stage = (slot >= stage_start[:, None]) & (slot < (stage_start + staged)[:, None])  # [b, c]
        return jnp.where(in_stage[:, None, None, :], stage, packed)

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, stage_start=None):
        """placed [l, b, k, c, h]: every slot's key (zeros where empty); stage_start [b]: the group being filled."""
        codes, scale, zero = kernel_choice.encoder(kernels, "key_groups")(placed, bits, group_size, placed.dtype)
        if placed.shape[3] == 0:
            stage = jnp.zeros(placed.shape[:3] + (0,) + placed.shape[4:], placed.dtype)
        else:
            idx = jnp.minimum(stage_start[:, None] + jnp.arange(group_size), placed.shape[3] - 1)  # [b, G]
            stage = jnp.take_along_axis(placed, idx[None, :, None, :, None], axis=3)
        return cls(codes, scale, zero, stage, bits, group_size)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        """Keys [..., T, h] in slot order (T a multiple of G: groups of G consecutive) as stored and read back."""
        return qp.decode_key_groups(*qp.encode_key_groups_reference(x, bits, group_size, dtype), bits, group_size,
                                    dtype)


@struct.dataclass
class Symmetric(_Raw):
    codes: jax.Array  # uint32 [l, b, k, c, w]
    scale: jax.Array  # [l, b, k, c, 1]
    bits: int = struct.field(pytree_node=False)
    SLOTS = ("codes", "scale")

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), jnp.zeros((l, b, k, c, 1), dtype), bits)

    @property
    def slots(self) -> int:
        return self.codes.shape[3]

    def _encode(self, x, kernels):
        return kernel_choice.encoder(kernels, "sym")(x, self.bits, self.scale.dtype)

    def write(self, layer, rows, slot, x, kernels):
        codes, scale = (a[:, :, 0] for a in self._encode(x[:, :, None], kernels))
        at = (rows, slice(None), slot)
        return self.replace(codes=_put(self.codes, layer, at, codes), scale=_put(self.scale, layer, at, scale))

    def write_group(self, layer, rows, start, x, kernels):
        codes, scale = self._encode(x, kernels)
        at = _group_slots(rows, start, x.shape[2])
        return self.replace(codes=_put(self.codes, layer, at, _by_slot(codes)),
                            scale=_put(self.scale, layer, at, _by_slot(scale)))

    def read_group(self, layer, start, g, dtype):
        take = lambda a: _take_group(a, layer, start, g)
        return qp.decode_sym(take(self.codes), take(self.scale), self.bits, dtype)

    def scores(self, layer, q, stage_start=None, staged=None):
        return da.sym_scores(q, self.codes[layer], self.scale[layer], bits=self.bits)

    def mix(self, layer, p):
        return da.sym_mix(p, self.codes[layer], self.scale[layer], bits=self.bits)

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, stage_start=None):
        codes, scale = kernel_choice.encoder(kernels, "sym")(placed, bits, placed.dtype)
        return cls(codes, scale, bits)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return qp.decode_sym(*qp.encode_sym_reference(x, bits, dtype), bits, dtype)


def store_class(bits: int, symmetric: bool, keys: bool):
    """The store of one side of a tier at `bits`."""
    if bits == 16:
        return Dense
    if symmetric:
        return Symmetric
    return KiviKeys if keys else KiviValues


def same_codes(a: type, b: type, bits_a: int, bits_b: int) -> bool:
    """Whether a group moved from a store of (a, bits_a) to (b, bits_b) keeps its codes (copied, not re-encoded)."""
    return a is b and bits_a == bits_b
