"""How one side (keys or values) of one tier is stored, for the layers of one store segment.

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

Within a segment (kvjax.layout.Layout.store_segments) a tier whose widths differ by layer keeps a
store per pair of (key, value) widths its layers use, each holding the layers at it: `ByWidth`
(one per side), which has the same interface, so that one layer scan runs every layer.

A layer's store has the same small interface in every class, which the step-by-step cache
(kvjax.tiered) uses: `write` one token per row, `take_raw` / `put_raw` a whole group of G slots
as stored (demotion: `moved` turns one tier's codes into the next's, copied or re-encoded), and
`fill` from a sequence's tokens placed at their slots (the state teacher forcing reaches;
benchmarks). Attention reads a store's arrays as they lie: kvjax.tiered hands them to the backend
as `pallas_kernels.xla_attention.Part`s, packed codes and all. `roundtrip(x, bits, G, dtype)` is
what reading stored tokens back gives, in float32, with scales stored in `dtype` (KIVI keys: given in
slot order, whole groups), which the teacher-forced path (kvjax.teacher_forced) uses to score
exactly. Codes come from the encoders that the backend (kvjax.kernels)
picks (Pallas kernel or reference, bit-identical); slots out of range are not written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import quantize_pack as qp


def _by_slot(x):
    return x.swapaxes(1, 2)  # [b, k, G, ...] -> [b, G, k, ...]: the layout of a scatter at [rows, :, slots]


def write_at(array, index, values):
    """`array` with `values` (cast to its dtype) written at `index`; indices out of range are dropped."""
    return array.at[index].set(values.astype(array.dtype), mode="drop")


def write_slots(array, slots, x, layer=None):
    """array [l, b, k, s, h] with x [b, t, k, h] written at slots [b, t] of `layer`, or, with no layer,
    x [l, b, k, t, h] at those slots of every layer; slots out of range (s or more) are not written."""
    rows = jnp.arange(slots.shape[0])[:, None]
    if layer is None:
        return write_at(array, (slice(None), rows, slice(None), slots), x.transpose(1, 3, 0, 2, 4))
    return write_at(array, (layer, rows, slice(None), slots), x)


def only_if(pred, fn, *operands):
    """fn(*operands) when the scalar `pred` holds, else zeros of its shapes: for work whose result
    is written only at slots that exist when `pred` holds (a ring's group decoded and encoded
    again when it moves, 1 step in G), so the other steps skip it. The operands should be small:
    what is read of a whole cache array is read outside (a branch holding it could make XLA copy
    the array)."""
    zeros = lambda *a: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *a))
    return jax.lax.cond(pred, fn, zeros, *operands)


def after_reading(read, x):
    """x, made to depend on the scalar `read` (taken from something just read), so that XLA schedules
    the write of x after that read and updates the array in place, instead of copying the whole
    array to keep what was read (its value is x: it would differ only if `read` were NaN)."""
    return jnp.where(jnp.isnan(read), jnp.zeros_like(x), x)


class _Store:
    """What every store shares: layer views, and copying a group's arrays as they are.

    SLOTS names the fields with one entry per slot, GROUPS those with one per group of G slots.
    Every store has a last field `at`: None for the whole store, the layer index in a view."""

    SLOTS: tuple[str, ...] = ()
    GROUPS: tuple[str, ...] = ()
    staged = False  # whether keys wait in a 16-bit stage until their group is complete (KiviKeys of a head tier)

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
        return write_at(getattr(self, name), self._index(index), values)

    def take(self, slots, fields=None):
        """The fields of this view's layer at slots [b, N] (clamped inside; whole groups of G slots,
        each group's slots in order) -> {field: [b, k, N, ...] per slot, or [b, k, N / G, ...] per
        group}."""
        rows = jnp.arange(slots.shape[0])[:, None]
        slots = jnp.clip(slots, 0, self.slots - 1)
        raw = {}
        for f in fields or self.SLOTS + self.GROUPS:
            at = slots if f in self.SLOTS else slots[:, ::self.group_size] // self.group_size
            raw[f] = getattr(self, f)[self._index((rows, slice(None), at))].swapaxes(1, 2)
        return raw

    def put(self, slots, raw, keep=None):
        """This store with raw fields (as `take` gives them) written at slots [b, N] where keep [b, N]
        (default: everywhere; a group's fields where its first slot is kept)."""
        rows = jnp.arange(slots.shape[0])[:, None]
        slots = slots if keep is None else jnp.where(keep, slots, self.slots)  # out of range: dropped
        out = {}
        for f in self.SLOTS + self.GROUPS:
            g = 1 if f in self.SLOTS else self.group_size
            at = jnp.where(slots[:, ::g] < self.slots, slots[:, ::g] // g, self.slots // g)
            out[f] = self._put(f, (rows, slice(None), at), _by_slot(raw[f]))
        return self.replace(**out)

    def take_raw(self, start, g):
        """The whole group of G slots from start [b], as it is stored."""
        return self.take(start[:, None] + jnp.arange(g))

    def put_raw(self, start, raw):
        """A group as `take_raw` gives it, written at the G slots from start [b] (none if out of range)."""
        return self.put(start[:, None] + jnp.arange(raw[self.SLOTS[0]].shape[2]), raw)

    def write(self, slot, x, backend):
        """x [b, k, h] (one token per row) encoded at slot [b]."""
        return self.put(slot[:, None], self.encode(x[:, :, None], backend))

    def probe(self):
        """One element of each of this store's fields, summed, float32 []: what a later write can be made
        to wait for (`after_reading`), so that it comes after every write into this store."""
        return sum(getattr(self, f).reshape(-1)[0].astype(jnp.float32) for f in self.SLOTS + self.GROUPS)

    def decoded(self):
        """Every slot of this view's layer as it is read back, float32 [b, k, c, h] (empty slots: anything)."""
        return self.decode({f: self.get(f) for f in self.SLOTS + self.GROUPS})

    def select(self, pick, a: dict, b: dict) -> dict:
        """Raw fields ([b, k, N, ...], as `take` gives them) of `a` where pick [b, N], else of `b` (a
        group's fields by its first slot)."""
        return {f: jnp.where(_per_field(self, f, pick), a[f], b[f]) for f in self.SLOTS + self.GROUPS}

    def gather(self, raw: dict, at) -> dict:
        """Raw fields of the slots at indices at [b, N] (whole groups, in order) of raw fields."""
        out = {}
        for f in self.SLOTS + self.GROUPS:
            i = at if f in self.SLOTS else at[:, ::self.group_size] // self.group_size
            out[f] = jnp.take_along_axis(raw[f], i.reshape(i.shape[:1] + (1,) + i.shape[1:] + (1,) * (raw[f].ndim - 3)),
                                         axis=2)
        return out


def _per_field(store, field: str, x):
    """x [b, N] (per slot) as it broadcasts against the raw field `field` [b, k, N or N / G, ...]."""
    x = x if field in store.SLOTS else x[:, ::store.group_size]
    return x.reshape(x.shape[:1] + (1,) + x.shape[1:] + (1,) * (getattr(store, field).ndim - 4))


@struct.dataclass
class Dense(_Store):
    x: jax.Array  # [l, b, k, c, h]
    at: jax.Array | None = None
    SLOTS = ("x",)

    @classmethod
    def init(cls, shape, bits, group_size, dtype):
        return cls(jnp.zeros(shape, dtype))

    def encode(self, x, backend):
        return {"x": x.astype(self.x.dtype)}

    def decode(self, raw, dtype=jnp.float32):
        return raw["x"].astype(dtype)

    @classmethod
    def fill(cls, placed, bits, group_size, backend, dtype, stage_start=None):
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
        side = lambda: jnp.zeros((l, b, k, c, h // group_size), dtype)  # one array each: a cache may be donated
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), side(), side(), bits, group_size)

    def encode(self, x, backend):
        codes, scale, zero = backend.encoder("values")(x, self.bits, self.group_size, self.scale.dtype)
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode(self, raw, dtype=jnp.float32):
        return qp.decode_values(raw["codes"], raw["scale"], raw["zero"], self.bits, self.group_size, dtype)

    @classmethod
    def fill(cls, placed, bits, group_size, backend, dtype, stage_start=None):
        codes, scale, zero = backend.encoder("values")(placed, bits, group_size, dtype)
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
        side = lambda: jnp.zeros((l, b, k, c // group_size, h), dtype)  # one array each: a cache may be donated
        return cls(jnp.zeros((l, b, k, c, h * bits // 32), jnp.uint32), side(), side(),
                   jnp.zeros((l, b, k, group_size if c else 0, h), dtype), bits, group_size)

    def encode(self, x, backend):
        """Keys x [..., N, h] of whole groups, each group's G keys in slot order."""
        codes, scale, zero = backend.encoder("key_groups")(x, self.bits, self.group_size, self.scale.dtype)
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode(self, raw, dtype=jnp.float32):
        return qp.decode_key_groups(raw["codes"], raw["scale"], raw["zero"], self.bits, self.group_size, dtype)

    def put_stage(self, slots, x, keep):
        """Keys x [b, k, N, h] of the group being filled into the stage (at slot % G) for slots [b, N]
        where keep [b, N]."""
        rows = jnp.arange(slots.shape[0])[:, None]
        at = jnp.where(keep & (slots < self.slots), slots % self.group_size, self.group_size)  # else dropped
        return self.replace(stage=self._put("stage", (rows, slice(None), at), _by_slot(x)))

    def write(self, slot, x, backend):
        """x [b, k, h] at slot [b]: into the stage; the group's last slot encodes the whole group."""
        g = self.group_size
        inside = slot < self.slots
        written = self.put_stage(slot[:, None], x[:, :, None], inside[:, None])
        complete = inside & (slot % g == g - 1)
        start = jnp.where(complete, slot - g + 1, self.slots)  # out of range: nothing stored
        return written.put(start[:, None] + jnp.arange(g), self.encode(written.get("stage"), backend))

    def without_stage(self):
        """This store with no 16-bit stage: for a tier only reached by demotion (whole groups)."""
        return self.replace(stage=self.stage[..., :0, :])

    @property
    def staged(self) -> bool:
        return self.stage.shape[-2] > 0

    @classmethod
    def fill(cls, placed, bits, group_size, backend, dtype, stage_start=None):
        """placed [l, b, k, c, h]: every slot's key (zeros where empty); stage_start [b]: the group being
        filled; `dtype`: what scales, zeros and the stage are stored in."""
        codes, scale, zero = backend.encoder("key_groups")(placed, bits, group_size, dtype)
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

    def encode(self, x, backend):
        codes, scale = backend.encoder("sym")(x, self.bits, self.scale.dtype)
        return {"codes": codes, "scale": scale}

    def decode(self, raw, dtype=jnp.float32):
        return qp.decode_sym(raw["codes"], raw["scale"], self.bits, dtype)

    @classmethod
    def fill(cls, placed, bits, group_size, backend, dtype, stage_start=None):
        codes, scale = backend.encoder("sym")(placed, bits, dtype)
        return cls(codes, scale, bits)

    @staticmethod
    def roundtrip(x, bits, group_size, dtype):
        return qp.decode_sym(*qp.encode_sym_reference(x, bits, dtype), bits, jnp.float32)


@struct.dataclass
class ByWidth:
    """One side of a tier whose widths differ between the layers of a segment: a store per pair of
    (key, value) widths its layers use (`stores`, each [l_j, b, k, c, ...] over the layers at it),
    with each layer's store (`choice`) and its place in it (`place`).

    A layer's view holds every store's view, read at the layer's place (clamped: a store it is not
    in is read harmlessly). Where the layer's store is known while tracing (`which` an int: a decode
    step's scan over layers of the same widths) only that store is read and written; where it is data
    (int32 []: a prompt chunk's one scan over every layer), raw fields come per store, decoding
    picks the layer's (`lax.switch`), encoding runs for it alone (`only_if`), and the other stores
    are written at slots out of range (dropped)."""

    stores: tuple
    choice: tuple[int, ...] = struct.field(pytree_node=False)  # per layer of the segment: which store holds it
    place: tuple[int, ...] = struct.field(pytree_node=False)  # per layer: its index in that store
    which: int | None = struct.field(pytree_node=False, default=None)  # a view's store, known while tracing
    which_data: jax.Array | None = None  # or int32 []: a view's store, as data

    @property
    def slots(self) -> int:
        return self.stores[0].slots

    @property
    def staged(self) -> bool:
        return self.stores[0].staged

    def layer(self, i, which: int | None = None):
        """The view of layer i (an index into the segment); `which`: its store, if known while tracing."""
        place = jnp.asarray(self.place, jnp.int32)[i]
        sizes = [self.choice.count(j) for j in range(len(self.stores))]
        return self.replace(stores=tuple(s.layer(jnp.minimum(place, n - 1)) for s, n in zip(self.stores, sizes)),
                            which=which, which_data=None if which is not None else
                            jnp.asarray(self.choice, jnp.int32)[i])

    def whole(self):
        return self.replace(stores=tuple(s.whole() for s in self.stores), which=None, which_data=None)

    def without_stage(self):
        return self.replace(stores=tuple(s.without_stage() for s in self.stores))

    def is_(self, j: int):
        """Whether this view's layer is in store j: a bool, or a bool [] where that is data."""
        return self.which == j if self.which is not None else self.which_data == j

    def _each(self, fn):
        """(fn(j, store) for the stores this view touches; None for the others) as a tuple."""
        return tuple(fn(j, s) if self.which in (None, j) else None for j, s in enumerate(self.stores))

    def _write_each(self, fn):
        """This view with fn(j, store, mine) for the stores it touches; mine: the layer is in it (data)."""
        return self.replace(stores=tuple(s if self.which not in (None, j) else fn(j, s, self.is_(j))
                                         for j, s in enumerate(self.stores)))

    def _out_unless(self, mine, slot, store):
        return slot if mine is True else jnp.where(mine, slot, store.slots)

    def get(self, name: str):
        if self.which is not None:
            return self.stores[self.which].get(name)
        return jnp.stack([s.get(name) for s in self.stores])[self.which_data]

    def encode(self, x, backend):
        """Raw fields per store: the layer's store encodes x (where that is data, the others give zeros)."""
        if self.which is not None:
            return self._each(lambda j, s: s.encode(x, backend))
        return self._each(lambda j, s: only_if(self.is_(j), functools.partial(s.encode, backend=backend), x))

    def decode(self, raw, dtype=jnp.float32):
        """Raw fields per store (as `take` gives them) -> [b, k, N, h] in `dtype`, read from the layer's store."""
        if self.which is not None:
            return self.stores[self.which].decode(raw[self.which], dtype)
        branches = [functools.partial(lambda s, j, r: s.decode(r[j], dtype), s, j) for j, s in enumerate(self.stores)]
        return jax.lax.switch(self.which_data, branches, raw)

    def take(self, slots):
        return self._each(lambda j, s: s.take(slots))

    def put(self, slots, raw, keep=None):
        keep = jnp.ones(slots.shape, bool) if keep is None else keep
        return self._write_each(lambda j, s, mine: s.put(slots, raw[j], keep & mine))

    def take_raw(self, start, g):
        return self._each(lambda j, s: s.take_raw(start, g))

    def put_raw(self, start, raw):
        return self._write_each(lambda j, s, mine: s.put_raw(self._out_unless(mine, start, s), raw[j]))

    def write(self, slot, x, backend):
        return self._write_each(lambda j, s, mine: s.write(self._out_unless(mine, slot, s), x, backend))

    def put_stage(self, slots, x, keep):
        return self._write_each(lambda j, s, mine: s.put_stage(slots, x, keep & mine))

    def select(self, pick, a, b):
        return self._each(lambda j, s: s.select(pick, a[j], b[j]))

    def gather(self, raw, at):
        return self._each(lambda j, s: s.gather(raw[j], at))

    def probe(self):
        return sum(s.probe() for j, s in enumerate(self.stores) if self.which in (None, j))


def moved(store, source, raw, backend, pred=True):
    """Raw fields of `source` (a layer's view; as its `take` gives them) as `store` keeps them after a
    move down a chain: the same codes where the two store the layer alike, else decoded (float32) and
    encoded again, as decoding's demotion does. `pred`, a scalar: whether any of it will be written
    (when not, the decoding and encoding are skipped; True: always computed)."""
    def run(fn, x, when=True):
        return fn(x) if when is True else only_if(when, fn, x)

    per_width = lambda s: isinstance(s, ByWidth)
    if not per_width(store) and not per_width(source):
        if same_codes(type(source), type(store), getattr(source, "bits", 16), getattr(store, "bits", 16)):
            return raw
        return run(lambda r: store.encode(source.decode(r), backend), raw, pred)
    sources = source.stores if per_width(source) else (source,)
    raws = raw if per_width(source) else (raw,)
    decoded = None
    out = []
    for j, dst in enumerate(store.stores if per_width(store) else (store,)):
        mine = store.is_(j) if per_width(store) else True
        if mine is False:  # known while tracing: the layer is in another store
            out.append(None)
            continue
        copies = [(source.is_(c) if per_width(source) else True, r) for c, (s, r) in enumerate(zip(sources, raws))
                  if same_codes(type(s), type(dst), getattr(s, "bits", 16), getattr(dst, "bits", 16))]
        copies = [(c, r) for c, r in copies if c is not False]
        if any(c is True for c, _ in copies):  # known while tracing: the same codes
            out.append(next(r for c, r in copies if c is True))
            continue
        copied = functools.reduce(jnp.logical_or, [c for c, _ in copies], jnp.asarray(False))
        if decoded is None:
            decoded = run(source.decode, raw, pred)  # float32 [b, k, N, h]
        r = run(functools.partial(dst.encode, backend=backend), decoded, jnp.logical_and(pred, mine) & ~copied)
        for c, src_raw in copies:
            r = jax.tree_util.tree_map(lambda x, y, c=c: jnp.where(c, x, y), src_raw, r)
        out.append(r)
    return tuple(out) if per_width(store) else out[0]


@struct.dataclass
class TierStores:
    """Both sides of one tier: per segment of layers, a store of its keys and one of its values."""

    keys: tuple  # per store segment: a store [l_seg, b, k, c, ...] (or a ByWidth)
    values: tuple

    def with_segment(self, segment: int, keys, values) -> "TierStores":
        """These stores with segment `segment`'s replaced by the whole stores of the views keys, values."""
        put = lambda items, item: items[:segment] + (item.whole(),) + items[segment + 1:]
        return TierStores(put(self.keys, keys), put(self.values, values))


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
