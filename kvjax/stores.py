"""How one side (keys or values) of one tier is stored, for the layers of one segment.

  Dense       16 bits as is                  x      [l, b, k, c, h]
  KiviKeys    KIVI keys: per channel, in     codes  uint32 [l, b, k, c, h * bits / 32]
              groups of G slots; a group's   scale, zero [l, b, k, c / G, h]
              keys wait in the 16-bit stage  stage  [l, b, k, G, h] (G = 0 in a tier only
              until it is full               reached by demotion, which moves whole groups)
  KiviValues  KIVI values: per token, in     codes  uint32 [l, b, k, c, h * bits / 32]
              groups of G channels           scale, zero [l, b, k, c, h / G]
  Symmetric   per token, over the head dim   codes  uint32 [l, b, k, c, h * bits / 32], scale [l, b, k, c, 1]

A decode step works on one layer at a time: `layer(i)` is the store of layer i, the same class
holding the whole [l, ...] arrays and the index `at` = i; its methods write into layer i of the
whole arrays and read that layer (`get`). A view never copies the layer out: a slice of a layer
that is written and read again in one step is materialized by XLA (once to write into, once to
write back: the whole tier, every layer, every step), while a write into the whole array is in
place, as in kvjax.cache.DenseCache. `view.whole()` gives the whole store back.

A layer's store has the same small interface in every class, which the step-by-step cache
(kvjax.tiered) uses: `write` one token per row, `write_group` / `read_group` a whole group of G
slots (demotion; `take_raw` / `put_raw` when the codes are copied as they are), `scores` (a
keys store: q . every slot's key) or `mix` (a values store: the probability-weighted sum of its
values), both straight from the packed codes (pallas_kernels.decode_attention), and `fill` from
a sequence's tokens placed at their slots (prompts). `roundtrip(x, bits, G, dtype)` is what
reading stored tokens back gives, in float32, with scales stored in `dtype` (KIVI keys: given in
slot order, whole groups), which the teacher-forced path (kvjax.teacher_forced) uses to score
exactly. Codes come from the encoders that kvjax.kernels
picks (Pallas kernel or reference, bit-identical); slots out of range are not written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import kernels as kernel_choice
from pallas_kernels import decode_attention as da
from pallas_kernels import quantize_pack as qp


def _group_slots(rows, start, g):
    return rows[:, None], slice(None), start[:, None] + jnp.arange(g)  # [b, G] slots from start [b]


def _by_slot(x):
    return x.swapaxes(1, 2)  # [b, k, G, ...] -> [b, G, k, ...]: the layout of a scatter at [rows, :, slots]


def _set(array, index, values):
    return array.at[index].set(values.astype(array.dtype), mode="drop")


class _Store:
    """What every store shares: layer views, and copying a group's arrays as they are.

    SLOTS names the fields with one entry per slot, GROUPS those with one per group of G slots.
    Every store has a last field `at`: None for the whole store, the layer index in a view."""

    SLOTS: tuple[str, ...] = ()
    GROUPS: tuple[str, ...] = ()

    @property
    def slots(self) -> int:
        return getattr(self, self.SLOTS[0]).shape[-2]

    def layer(self, i):
        """The view of layer i (no copy)."""
        return self.replace(at=jnp.asarray(i, jnp.int32))

    def whole(self):
        """The whole store this view of a layer has written into."""
        return self.replace(at=None)

    def _index(self, index: tuple) -> tuple:
        return index if self.at is None else (self.at,) + index

    def get(self, name: str):
        """This view's layer of a field, [b, k, ...]."""
        a = getattr(self, name)
        return a if self.at is None else a[self.at]

    def _put(self, name: str, index: tuple, values):
        """The field `name` with `values` written at `index` of this view's layer."""
        return _set(getattr(self, name), self._index(index), values)

    def _take_group(self, name: str, start, g):
        """A field at the G slots from start [b] -> [b, k, G, ...] (start clamped inside)."""
        rows = jnp.arange(start.shape[0])[:, None]
        slots = jnp.minimum(start[:, None] + jnp.arange(g), self.slots - 1)
        return getattr(self, name)[self._index((rows, slice(None), slots))].swapaxes(1, 2)

    def _take_group_entry(self, name: str, start, g):
        """A per-group field at the group of slot start [b] -> [b, k, ...]."""
        group = jnp.minimum(start // g, self.slots // g - 1)
        return getattr(self, name)[self._index((jnp.arange(start.shape[0]), slice(None), group))]

    def take_raw(self, start, g):
        raw = {f: self._take_group(f, start, g) for f in self.SLOTS}
        raw.update({f: self._take_group_entry(f, start, g) for f in self.GROUPS})
        return raw

    def put_raw(self, rows, start, raw):
        g = raw[self.SLOTS[0]].shape[2]
        out = {f: self._put(f, _group_slots(rows, start, g), _by_slot(raw[f])) for f in self.SLOTS}
        group = (rows, slice(None), jnp.where(start < self.slots, start // g, self.slots // g))
        out.update({f: self._put(f, group, raw[f]) for f in self.GROUPS})
        return self.replace(**out)


@struct.dataclass
class Dense(_Store):
    x: jax.Array  # [l, b, k, c, h]
    at: jax.Array | None = None
    SLOTS = ("x",)

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        return cls(jnp.zeros(shape, dtype))

    def write(self, rows, slot, x, kernels):
        return self.replace(x=self._put("x", (rows, slice(None), slot), x))

    def write_group(self, rows, start, x, kernels):
        return self.replace(x=self._put("x", _group_slots(rows, start, x.shape[2]), _by_slot(x)))

    def read_group(self, start, g, dtype):
        return self._take_group("x", start, g).astype(dtype)

    def scores(self, q, stage_start=None, staged=None):
        return da.dense_scores(q, self.get("x"))

    def mix(self, p):
        return da.dense_mix(p, self.get("x"))

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, dtype, stage_start=None):
        return cls(placed.astype(dtype))

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return x.astype(dtype).astype(jnp.float32)


@struct.dataclass
class KiviValues(_Store):
    codes: jax.Array  # uint32 [l, b, k, c, w]
    scale: jax.Array  # [l, b, k, c, h / G]
    zero: jax.Array
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    at: jax.Array | None = None
    SLOTS = ("codes", "scale", "zero")

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        side = jnp.zeros((l, b, k, c, h // group_size), dtype)
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), side, side, bits, group_size)

    def _encode(self, x, kernels):
        return kernel_choice.encoder(kernels, "values")(x, self.bits, self.group_size, self.scale.dtype)

    def write(self, rows, slot, x, kernels):
        """x [b, k, h] at slot [b]."""
        codes, scale, zero = (a[:, :, 0] for a in self._encode(x[:, :, None], kernels))
        where = (rows, slice(None), slot)
        return self.replace(codes=self._put("codes", where, codes), scale=self._put("scale", where, scale),
                            zero=self._put("zero", where, zero))

    def write_group(self, rows, start, x, kernels):
        """x [b, k, G, h] at the G slots from start [b]."""
        codes, scale, zero = self._encode(x, kernels)
        where = _group_slots(rows, start, x.shape[2])
        return self.replace(codes=self._put("codes", where, _by_slot(codes)),
                            scale=self._put("scale", where, _by_slot(scale)), zero=self._put("zero", where, _by_slot(zero)))

    def read_group(self, start, g, dtype):
        take = lambda f: self._take_group(f, start, g)
        return qp.decode_values(take("codes"), take("scale"), take("zero"), self.bits, self.group_size, dtype)

    def mix(self, p):
        return da.kivi_value_mix(p, self.get("codes"), self.get("scale"), self.get("zero"), bits=self.bits,
                                 group_size=self.group_size)

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, dtype, stage_start=None):
        codes, scale, zero = kernel_choice.encoder(kernels, "values")(placed, bits, group_size, dtype)
        return cls(codes, scale, zero, bits, group_size)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return qp.decode_values(*qp.encode_values_reference(x, bits, group_size, dtype), bits, group_size, jnp.float32)


def staged_slots(c: int, stage_start, staged):
    """Bool [b, c]: the `staged` [b] slots from stage_start [b], whose keys are still in a KIVI stage."""
    slot = jnp.arange(c)[None, :]
    return (slot >= stage_start[:, None]) & (slot < (stage_start + staged)[:, None])


@struct.dataclass
class KiviKeys(_Store):
    codes: jax.Array  # uint32 [l, b, k, c, w]
    scale: jax.Array  # [l, b, k, c / G, h]
    zero: jax.Array
    stage: jax.Array  # [l, b, k, G, h]: the 16-bit keys of the group being filled
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    at: jax.Array | None = None
    SLOTS = ("codes",)
    GROUPS = ("scale", "zero")

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        side = jnp.zeros((l, b, k, c // group_size, h), dtype)
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), side, side,
                   jnp.zeros((l, b, k, group_size if c else 0, h), dtype), bits, group_size)

    def _encode(self, x, kernels):
        return kernel_choice.encoder(kernels, "key_groups")(x, self.bits, self.group_size, self.scale.dtype)

    def _store_group(self, rows, start, codes, scale, zero, inside):
        """Codes [b, k, G, w] and scale/zero [b, k, 1, h] of whole groups starting at start [b] where inside [b]."""
        g = self.group_size
        slots = _group_slots(rows, jnp.where(inside, start, self.slots), g)
        group = (rows, slice(None), jnp.where(inside, start // g, self.slots // g))
        return self.replace(codes=self._put("codes", slots, _by_slot(codes)),
                            scale=self._put("scale", group, scale[:, :, 0]), zero=self._put("zero", group, zero[:, :, 0]))

    def write(self, rows, slot, x, kernels):
        """x [b, k, h] at slot [b]: into the stage; the group's last slot encodes the whole group."""
        g = self.group_size
        inside = slot < self.slots
        written = self.replace(stage=self._put("stage", (rows, slice(None), jnp.where(inside, slot % g, g)), x))
        codes, scale, zero = self._encode(written.get("stage"), kernels)  # [b, k, G, w], [b, k, 1, h]
        complete = inside & (slot % g == g - 1)
        return written._store_group(rows, slot - g + 1, codes, scale, zero, complete)

    def write_group(self, rows, start, x, kernels):
        codes, scale, zero = self._encode(x, kernels)
        return self._store_group(rows, start, codes, scale, zero, start < self.slots)

    def read_group(self, start, g, dtype):
        """Keys [b, k, G, h] of the complete group at slots start.. (start [b])."""
        side = lambda f: self._take_group_entry(f, start, g)[:, :, None]  # [b, k, 1, h]
        return qp.decode_key_groups(self._take_group("codes", start, g), side("scale"), side("zero"), self.bits, g,
                                    dtype)

    def without_stage(self):
        """This store with no 16-bit stage: for a tier only reached by demotion (whole groups)."""
        return self.replace(stage=self.stage[..., :0, :])

    def scores(self, q, stage_start, staged):
        """q [b, k, g, h] . every slot's key [b, k, g, c]; the `staged` [b] slots from stage_start [b] are
        read from the 16-bit stage (their group is not complete)."""
        g = self.group_size
        packed = da.kivi_key_scores(q, self.get("codes"), self.get("scale"), self.get("zero"), bits=self.bits,
                                    group_size=g)
        if not self.stage.shape[-2]:  # no stage: every group is whole
            return packed
        stage = jnp.tile(da.dense_scores(q, self.get("stage")), (1, 1, 1, self.slots // g))  # slot s -> stage s % G
        return jnp.where(staged_slots(self.slots, stage_start, staged)[:, None, None, :], stage, packed)

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, dtype, stage_start=None):
        """placed [l, b, k, c, h]: every slot's key (zeros where empty); stage_start [b]: the group being
        filled; `dtype`: what scales, zeros and the stage are stored in."""
        codes, scale, zero = kernel_choice.encoder(kernels, "key_groups")(placed, bits, group_size, dtype)
        if placed.shape[3] == 0:
            stage = jnp.zeros(placed.shape[:3] + (0,) + placed.shape[4:], dtype)
        else:
            idx = jnp.minimum(stage_start[:, None] + jnp.arange(group_size), placed.shape[3] - 1)  # [b, G]
            stage = jnp.take_along_axis(placed, idx[None, :, None, :, None], axis=3).astype(dtype)
        return cls(codes, scale, zero, stage, bits, group_size)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        """Keys [..., T, h] in slot order (T a multiple of G: groups of G consecutive) as stored and read back."""
        return qp.decode_key_groups(*qp.encode_key_groups_reference(x, bits, group_size, dtype), bits, group_size,
                                    jnp.float32)


@struct.dataclass
class Symmetric(_Store):
    codes: jax.Array  # uint32 [l, b, k, c, w]
    scale: jax.Array  # [l, b, k, c, 1]
    bits: int = struct.field(pytree_node=False)
    at: jax.Array | None = None
    SLOTS = ("codes", "scale")

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        l, b, k, c, h = shape
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), jnp.zeros((l, b, k, c, 1), dtype), bits)

    def _encode(self, x, kernels):
        return kernel_choice.encoder(kernels, "sym")(x, self.bits, self.scale.dtype)

    def write(self, rows, slot, x, kernels):
        codes, scale = (a[:, :, 0] for a in self._encode(x[:, :, None], kernels))
        where = (rows, slice(None), slot)
        return self.replace(codes=self._put("codes", where, codes), scale=self._put("scale", where, scale))

    def write_group(self, rows, start, x, kernels):
        codes, scale = self._encode(x, kernels)
        where = _group_slots(rows, start, x.shape[2])
        return self.replace(codes=self._put("codes", where, _by_slot(codes)),
                            scale=self._put("scale", where, _by_slot(scale)))

    def read_group(self, start, g, dtype):
        take = lambda f: self._take_group(f, start, g)
        return qp.decode_sym(take("codes"), take("scale"), self.bits, dtype)

    def scores(self, q, stage_start=None, staged=None):
        return da.sym_scores(q, self.get("codes"), self.get("scale"), bits=self.bits)

    def mix(self, p):
        return da.sym_mix(p, self.get("codes"), self.get("scale"), bits=self.bits)

    @classmethod
    def fill(cls, placed, bits, group_size, kernels, dtype, stage_start=None):
        codes, scale = kernel_choice.encoder(kernels, "sym")(placed, bits, dtype)
        return cls(codes, scale, bits)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return qp.decode_sym(*qp.encode_sym_reference(x, bits, dtype), bits, jnp.float32)


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
