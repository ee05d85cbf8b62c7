"""KV-cache policies: one class each, registered by name.

  fp16                every token in 16 bits (kvjax.cache.DenseCache)
  kivi2, kivi4, kivi8 KIVI: the R newest tokens in 16 bits, the older ones at 2/4/8 bits,
                      keys per channel (groups of G tokens), values per token (groups of G channels)
  kivi-k4v2, ...      KIVI with keys and values at different widths (kivi-kAvB, A, B in 2, 4, 8)
  int8-sink           selective quantization: S sink tokens and the W newest in 16 bits, the
                      middle int8 per token (symmetric); int4-sink, int2-sink at 4 and 2 bits
  streaming           StreamingLLM: S sinks and the W newest; everything else evicted
  band@B              widths by age: left tokens are stored at 4 bits (KIVI), then re-encoded at 2
                      bits once enough newer ones have left; a full cache averages B bits
  learned-alloc@B     widths per layer, keys/values and age band, learned under an average of B bits
                      (kvjax.allocation, train_controller.allocate; shipped for the default model)
  mixed-static@B      a width in {2, 4, 8, 16} per token under an average of B bits: static
  mixed-rule@B        (pseudo-random by position), rule (entropy and rarity), learned (the
  mixed-learned@B     controller of kvjax.controller; shipped for the default model at 2.5, 3
  mixed-random@B      and 4 bits) or random at the learned controller's histogram
  aliases             mixed@B = mixed-static@B, mixed = mixed-learned@3

A policy says, once, what becomes of a token when it leaves the 16-bit window: `tiers` lists
where left tokens can be stored (slots, widths per layer for keys and values, rings that demote)
given how many can leave; `entry` picks the tier of a leaving token. kvjax.layout holds the rules
every policy shares; the step-by-step cache, the prompt fill and the exact teacher-forced scorer
all derive from this description, and tests/test_policies.py proves them equal for every name in
`REGISTRY`. Adding a policy: docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from kvjax import kernels as kernel_choice
from kvjax.allocation import Allocation, default_allocation, load_allocation, shipped_allocation_budgets
from kvjax.cache import DenseCache, storage_dtype
from kvjax.config import ModelConfig
from kvjax.controller import Controller, default_controller, load_controller, shipped_controller_budgets
from kvjax.errors import KvjaxError
from kvjax.layout import CODE_WIDTHS, DEFAULT_GROUP, DEFAULT_SINKS, DEFAULT_WINDOW, EVICTED, WIDTHS, Layout, Tier
from kvjax.rotation import SUFFIXES, Rotation, suffix_of
from kvjax.tiered import TieredCache


@dataclasses.dataclass(frozen=True)
class Policy:
    """A KV-cache policy (static under jit: frozen and hashable)."""

    name: str
    uses_features = False  # whether token widths depend on model outputs (then scoring runs block by block)
    evicts = False  # whether tokens that leave the window may be dropped (`entry` returns EVICTED)

    def layout(self, cfg: ModelConfig, capacity: int) -> Layout | None:
        """The static shape of a cache for sequences of up to `capacity` tokens; None: plain 16-bit."""
        raise NotImplementedError

    def make_cache(self, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32,
                   kernels=kernel_choice.Kernels.AUTO, kv_dtype=None):
        """An empty cache for `batch` sequences of up to `capacity` tokens, for a model computing in
        `dtype`; 16-bit K/V are stored in `kv_dtype` (default: kvjax.cache.storage_dtype)."""
        raise NotImplementedError

    def check(self, cfg: ModelConfig):
        """Raises a KvjaxError if the policy cannot run on this model."""

    def average_bits(self, cfg: ModelConfig) -> float:
        """Bits per K/V element of the tokens that left the window, in a cache full at the model's
        context (evicted tokens count 0)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FP16(Policy):
    name: str = "fp16"

    def layout(self, cfg, capacity):
        return None

    def average_bits(self, cfg):
        return 16.0

    def make_cache(self, cfg, batch, capacity, dtype=jnp.float32, kernels=kernel_choice.Kernels.AUTO, kv_dtype=None):
        return DenseCache.init(cfg, batch, capacity, storage_dtype(dtype, kv_dtype), kernels)


@dataclasses.dataclass(frozen=True)
class Quantized(Policy):
    """A policy whose left tokens go to tiers (kvjax.tiered.TieredCache)."""

    sinks: int = DEFAULT_SINKS
    window: int = DEFAULT_WINDOW
    group_size: int = DEFAULT_GROUP
    rotate: str = "none"  # kvjax.rotation.ROTATIONS: which sides are stored Hadamard-rotated

    def __post_init__(self):
        Rotation.named(self.rotate)  # an unknown name is a KvjaxError here
        if self.window < 1 or self.sinks < 0:
            raise KvjaxError(f"{self.name}: window must be >= 1 and sinks >= 0")
        if self.group_size < 1:
            raise KvjaxError(f"{self.name}: group size must be >= 1, got {self.group_size}")

    def tiers(self, cfg: ModelConfig, left: int) -> tuple[Tier, ...]:
        """The tiers of a cache in which `left` tokens can leave the window."""
        raise NotImplementedError

    def entry(self, positions, features, entered, layout: Layout):
        """The tier each leaving token enters (int32 [b]; EVICTED drops it): positions [b], features
        [b, F] of its own step, entered [b, tiers] (tokens that entered each tier before it)."""
        return jnp.zeros(positions.shape, jnp.int32)

    def layout(self, cfg, capacity):
        left = max(capacity - self.sinks - self.window, 0)
        return Layout(self.sinks, self.window, self.group_size, self.tiers(cfg, left), cfg.num_layers,
                      min(self.sinks, capacity), min(self.window, max(capacity - self.sinks, 0)), self.rotation)

    @property
    def rotation(self) -> Rotation:
        return Rotation.named(self.rotate)

    def make_cache(self, cfg, batch, capacity, dtype=jnp.float32, kernels=kernel_choice.Kernels.AUTO, kv_dtype=None):
        self.check(cfg)
        return TieredCache.init(self, cfg, batch, capacity, storage_dtype(dtype, kv_dtype), kernels)

    def average_bits(self, cfg):
        """Read from the layout of a cache for the model's context (`Layout.average_bits`), so that a
        subclass says it only through its tiers. Tokens that enter several tiers fill them by the
        policy's choice, not slot by slot: such a policy (Mixed) states its own."""
        layout = self.layout(cfg, cfg.max_position_embeddings)
        if len(layout.heads) > 1:
            raise NotImplementedError(f"{self.name}: tokens enter {len(layout.heads)} tiers, whose slots are "
                                      "capacities, not shares: the policy states its average bits")
        return layout.average_bits

    def check(self, cfg):
        h = cfg.head_dim
        for t in self.tiers(cfg, self.group_size):
            for bits in t.key_bits + t.value_bits:
                if bits < 16 and (h * bits) % 32:
                    raise KvjaxError(f"{self.name}: head_dim={h} at {bits} bits does not fill whole 32-bit words")
                if bits < 16 and not t.symmetric and h % self.group_size:
                    raise KvjaxError(f"{self.name}: G={self.group_size} does not divide head_dim={h}")
        self.rotation.check(h)
        if self.sinks + self.window > cfg.max_position_embeddings:
            raise KvjaxError(f"{self.name}: sinks + window = {self.sinks + self.window} exceeds the model's "
                             f"context of {cfg.max_position_embeddings} tokens")


def _round_up(n: int, g: int) -> int:
    return -(-n // g) * g


def _per_layer(bits, num_layers: int, name: str) -> tuple[int, ...]:
    if isinstance(bits, int):
        return (bits,) * num_layers
    if callable(bits):  # a rule of the layer's depth
        return tuple(int(bits(layer / num_layers)) for layer in range(num_layers))
    if len(bits) != num_layers:
        raise KvjaxError(f"{name}: widths for {len(bits)} layers, the model has {num_layers}")
    return tuple(bits)


@dataclasses.dataclass(frozen=True)
class Bands(Quantized):
    """Widths by age. Every left token enters the first band; each band but the last is a ring of
    whole groups holding its share of a full cache's left tokens, whose oldest group moves on to the
    next band when a new one starts. One band is KIVI (or int8-sink, symmetric).

    Widths per band: (keys, values), each an int (every layer), a tuple (one per layer of the model)
    or a rule: a function of the layer's depth, layer / layers in [0, 1), to a width, which fits
    every model (`lambda depth: 4 if depth < 0.5 else 2`: 4 bits in the first half of the layers).
    A rule is compared by identity, as a static argument of jit: define it once, not per call."""

    bands: tuple = ((2, 2),)
    shares: tuple[float, ...] = ()  # per band but the last: its share of the left tokens
    symmetric: bool = False
    sinks: int = 0

    def __post_init__(self):
        super().__post_init__()
        if len(self.shares) != len(self.bands) - 1 or any(s <= 0 for s in self.shares) or sum(self.shares) > 1:
            raise KvjaxError(f"{self.name}: {len(self.bands)} bands need {len(self.bands) - 1} positive shares "
                             f"summing to at most 1, got {self.shares}")

    def tiers(self, cfg, left):
        g, total = self.group_size, _round_up(left, self.group_size)
        out, used = [], 0
        for i, (kb, vb) in enumerate(self.bands):
            last = i == len(self.bands) - 1
            slots = total - used if last else min(max(g, math.floor(self.shares[i] * left / g) * g), total - used)
            keys, values = _per_layer(kb, cfg.num_layers, self.name), _per_layer(vb, cfg.num_layers, self.name)
            out.append(Tier(_label(keys, values, i), slots, keys, values, self.symmetric, None if last else i + 1))
            used += slots
        return tuple(out)


def _label(keys, values, index: int) -> str:
    if len(set(keys)) == 1 and len(set(values)) == 1:
        return f"{keys[0]}-bit" if keys[0] == values[0] else f"K{keys[0]}V{values[0]}"
    return f"band {index + 1}"


@dataclasses.dataclass(frozen=True)
class Streaming(Quantized):
    """StreamingLLM: tokens that leave the window are evicted."""

    evicts = True

    def __post_init__(self):
        super().__post_init__()
        if self.rotate != "none":
            raise KvjaxError(f"{self.name}: it quantizes nothing to rotate; a rotation applies to quantized policies")

    def tiers(self, cfg, left):
        return ()

    def entry(self, positions, features, entered, layout):
        return jnp.full(positions.shape, EVICTED, jnp.int32)


PRECISIONS = ("static", "rule", "learned", "random")
CONTROLLED = ("learned", "random")  # precisions that need a controller
_UPGRADE_SHARES = {16: 0.2, 8: 0.3, 4: 0.5}  # share of the bits above 2 spent on 16-, 8- and 4-bit tokens


def max_budget() -> float:
    """The largest budget whose histogram keeps a non-negative 2-bit share."""
    return 2.0 + 1.0 / sum(share / (w - 2) for w, share in _UPGRADE_SHARES.items())


@dataclasses.dataclass(frozen=True)
class Mixed(Quantized):
    """A width in {2, 4, 8, 16} per token under an average-bit budget: a precision policy prefers a
    width; the token enters the nearest tier with room (in log2 bits, ties to the wider)."""

    budget_bits: float = 3.0
    precision: str = "static"
    controller: Controller | None = None  # for precision learned / random

    def __post_init__(self):
        super().__post_init__()
        if self.budget_bits < 2:
            raise KvjaxError(f"{self.name}: a budget of {self.budget_bits:g} bits is below 2 bits")
        if self.budget_bits > max_budget():
            raise KvjaxError(f"{self.name}: budget {self.budget_bits:g} bits is above {max_budget():.2f}")
        if self.precision not in PRECISIONS:
            raise KvjaxError(f"{self.name}: unknown precision policy {self.precision!r}; known: {PRECISIONS}")
        if (self.precision in CONTROLLED) != (self.controller is not None):
            raise KvjaxError(f"{self.name}: precision {self.precision!r} "
                             f"{'needs' if self.precision in CONTROLLED else 'takes no'} controller")
        if self.controller is not None and abs(self.controller.budget_bits - self.budget_bits) > 1e-6:
            raise KvjaxError(f"{self.name}: the controller was trained for {self.controller.budget_bits:g} bits, "
                             f"the policy asks for {self.budget_bits:g}")

    @property
    def uses_features(self) -> bool:
        return self.precision in ("rule", "learned")

    def average_bits(self, cfg):
        """The budget: every token enters the tier of its own width (as far as there is room)."""
        return self.budget_bits

    def histogram(self) -> dict[int, float]:
        """Target share of left tokens per width; its mean width is the budget."""
        if self.controller is not None:  # the controller's held-out histogram
            return dict(self.controller.histogram)
        extra = self.budget_bits - 2.0
        shares = {w: share * extra / (w - 2) for w, share in _UPGRADE_SHARES.items()}
        return {2: 1.0 - sum(shares.values()), **shares}

    def tiers(self, cfg, left):
        g, hist = self.group_size, self.histogram()
        caps = {w: _round_up(math.floor(hist[w] * left), g) for w in (4, 8, 16)}
        caps[2] = _round_up(max(left - sum(caps.values()), 0), g)
        return tuple(Tier(f"{w}-bit", caps[w], (w,) * cfg.num_layers, (w,) * cfg.num_layers) for w in WIDTHS)

    def check(self, cfg):
        super().check(cfg)
        if self.controller is not None:
            self.controller.check(cfg)

    def preferred(self, positions, features):
        """Preferred width int32 [...] of tokens leaving the window: positions [...], features [..., F]."""
        if self.precision in ("static", "random"):  # random assignment at the target histogram
            return _quantile_width(_position_hash(positions), self.histogram())
        if self.precision == "learned":
            return self.controller.widths(features)
        # rule: tokens the model was unsure after, or rare tokens, get more bits
        entropy, rarity = features[..., 0], features[..., 2]
        score = 0.5 * jnp.tanh(entropy / 4.0) + 0.5 * rarity
        return _quantile_width(jnp.clip(score, 0.0, 1.0 - 1e-6), self.histogram())

    def entry(self, positions, features, entered, layout):
        """The nearest tier with room to the preferred width: widths tried by |log2 w - log2 preferred|,
        ties to the wider."""
        preferred, caps = self.preferred(positions, features), layout.caps
        tier = jnp.zeros_like(preferred)
        for pref in WIDTHS:
            order = sorted(WIDTHS, key=lambda w: (abs(math.log2(w) - math.log2(pref)), -w))
            chosen = jnp.full_like(preferred, EVICTED)  # every tier full (cannot happen within the capacity)
            for w in reversed(order):  # the first in `order` with room wins
                i = WIDTHS.index(w)
                chosen = jnp.where(entered[:, i] < caps[i], i, chosen)
            tier = jnp.where(preferred == pref, chosen, tier)
        return tier


def _position_hash(positions):
    """Deterministic uniform numbers in [0, 1) from positions (Knuth multiplicative hash)."""
    x = positions.astype(jnp.uint32) * jnp.uint32(2654435761)
    x = x ^ (x >> jnp.uint32(16))
    return x.astype(jnp.float32) / 2.0**32


def _quantile_width(u, hist: dict[int, float]):
    """Maps u in [0, 1) to widths with the histogram's shares (2-bit first)."""
    width = jnp.full(u.shape, 2, jnp.int32)
    edge = hist[2]
    for w in (4, 8, 16):
        width = jnp.where(u >= edge, w, width)
        edge += hist[w]
    return width


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Family:
    """Policies that share a name: `name` or `name@BITS`."""

    name: str
    make: Callable  # (full name, budget or None, overrides dict) -> Policy
    help: str
    budget: str = "none"  # "none", "optional" (with a default) or "required"
    examples: tuple[str, ...] = ()  # instances the equivalence tests run (default: the name)
    takes_controller: bool = False
    takes_allocation: bool = False


REGISTRY: dict[str, Family] = {}
ALIASES = {"mixed": "mixed-learned@3"}  # and mixed@B -> mixed-static@B
_PREFIX_ALIASES = {"mixed@": "mixed-static@"}


def register(family: Family) -> Family:
    if family.name in REGISTRY:
        raise ValueError(f"policy {family.name!r} is registered twice")
    REGISTRY[family.name] = family
    return family


def _given_or_shipped(o: dict, key: str, kind: type, load: Callable, shipped: Callable, budget: float):
    """The `key` override popped from o (a `kind`, or a path to `load`), else the one shipped for the budget."""
    given = o.pop(key, None)
    if given is None:
        return shipped(budget)
    return given if isinstance(given, kind) else load(given)


def _controlled(precision):
    def make(name, budget, o):
        controller = _given_or_shipped(o, "controller", Controller, load_controller, default_controller, budget)
        return Mixed(name, budget_bits=budget, precision=precision, controller=controller, **o)
    return make


def _register_builtins():
    register(Family("fp16", lambda name, budget, o: FP16(), "every token in 16 bits"))
    for bits in CODE_WIDTHS:
        register(Family(f"kivi{bits}", lambda name, budget, o, b=bits: Bands(name, bands=((b, b),), **o),
                        f"KIVI at {bits} bits: 16-bit residual of R tokens, keys per channel, values per token"))
        register(Family(f"int{bits}-sink", lambda name, budget, o, b=bits: Bands(
            name, bands=((b, b),), symmetric=True, **{"sinks": DEFAULT_SINKS, **o}),
            f"S sinks + W newest in 16 bits, the rest {bits}-bit symmetric per token"))
    for kb in CODE_WIDTHS:
        for vb in CODE_WIDTHS:
            if kb != vb:
                register(Family(f"kivi-k{kb}v{vb}", lambda name, budget, o, k=kb, v=vb: Bands(
                    name, bands=((k, v),), **o), f"KIVI with keys at {kb} bits and values at {vb}"))
    register(Family("streaming", lambda name, budget, o: Streaming(name, **o),
                    "StreamingLLM: S sinks + W newest, the rest evicted"))
    register(Family("band", lambda name, budget, o: _band(name, budget, o),
                    "a 4-bit band of the newest left tokens, older ones at 2 bits; B in (2, 4]",
                    budget="required", examples=("band@3", "band@2.5")))
    allocations = f"{shipped_allocation_budgets()}; +rot: {shipped_allocation_budgets('both')}"
    register(Family("learned-alloc", _allocated, "widths per layer, keys/values and age band, learned under "
                    f"the budget (shipped: {allocations})", budget="required",
                    examples=("learned-alloc@2.5",), takes_allocation=True))
    register(Family("mixed-static", lambda name, budget, o: Mixed(name, budget_bits=budget, **o),
                    "a width per token in {2,4,8,16}, pseudo-random at the budget's histogram",
                    budget="required", examples=("mixed-static@3", "mixed-static@2.5")))
    register(Family("mixed-rule", lambda name, budget, o: Mixed(name, budget_bits=budget, precision="rule", **o),
                    "widths by next-token entropy and token rarity", budget="required",
                    examples=("mixed-rule@3", "mixed-rule@4")))
    controllers = shipped_controller_budgets()
    register(Family("mixed-learned", _controlled("learned"), f"widths from the learned controller (shipped: {controllers})",
                    budget="required", examples=("mixed-learned@3",), takes_controller=True))
    register(Family("mixed-random", _controlled("random"), "random widths at the learned controller's histogram",
                    budget="required", examples=("mixed-random@3",), takes_controller=True))


def _allocated(name, budget, o):
    rotate = o.get("rotate", "none")
    allocation = _given_or_shipped(o, "allocation", Allocation, load_allocation,
                                   lambda b: default_allocation(b, rotate), budget)
    if abs(allocation.average_bits - budget) > 0.05:
        raise KvjaxError(f"{name}: the allocation averages {allocation.average_bits:.3f} bits, not {budget:g}")
    if allocation.rotate != rotate:
        raise KvjaxError(f"{name}: the allocation was trained with rotate={allocation.rotate}, the policy stores "
                         f"rotate={rotate}: name it {split_rotation(name)[0]}{suffix_of(allocation.rotate)}")
    stored = {"sinks": allocation.sinks, "window": allocation.window, "group_size": allocation.group_size, **o}
    return Bands(name, bands=tuple(zip(allocation.keys, allocation.values)), shares=tuple(allocation.shares), **stored)


def _band(name, budget, o):
    if not 2.0 < budget <= 4.0:
        raise KvjaxError(f"{name}: a band policy takes 2 < B <= 4 bits, got {budget:g}")
    return Bands(name, bands=((4, 4), (2, 2)), shares=((budget - 2.0) / 2.0,), **{"sinks": DEFAULT_SINKS, **o})


_register_builtins()


def canonical_name(name: str) -> str:
    """`name` with aliases resolved (mixed -> mixed-learned@3, mixed@B -> mixed-static@B)."""
    name = ALIASES.get(name, name)
    for prefix, target in _PREFIX_ALIASES.items():
        if name.startswith(prefix):
            name = target + name[len(prefix):]
    return name


def family_of(name: str) -> Family:
    base = canonical_name(split_rotation(name)[0]).partition("@")[0]
    if base not in REGISTRY:
        raise KvjaxError(f"unknown KV-cache policy {name!r}; known: {', '.join(policy_names())}")
    return REGISTRY[base]


def get_policy(name: str, *, window: int | None = None, sinks: int | None = None, group_size: int | None = None,
               controller=None, allocation=None) -> Policy:
    """The policy called `name` (`kivi2`, `band@3`, `mixed-rule@2.5`, an alias; @BITS for the families
    registered with a budget: band, learned-alloc and the mixed ones; a rotation suffix, `kivi2+rot`,
    for a quantized one), with optional overrides of W, S, G, for learned and random policies the
    controller (a path or a Controller) and for learned-alloc the allocation (a path or a
    kvjax.allocation.Allocation)."""
    bare, suffix = split_rotation(name)
    full = canonical_name(bare)
    family = family_of(full)
    base, _, text = full.partition("@")
    budget = None
    if text:
        if family.budget == "none":
            takers = ", ".join(f"{f.name}@BITS" for f in REGISTRY.values() if f.budget != "none")
            raise KvjaxError(f"{name!r}: {base} takes no bit budget; the policies that do: {takers}")
        try:
            budget = float(text)
        except ValueError:
            raise KvjaxError(f"bad budget in {name!r}: {text!r} is not a number") from None
    elif family.budget == "required":
        raise KvjaxError(f"{name!r} needs a bit budget: {base}@BITS")
    overrides = {k: v for k, v in (("window", window), ("sinks", sinks), ("group_size", group_size)) if v is not None}
    if base == "fp16" and overrides:
        raise KvjaxError("--window/--group-size/--sinks need a quantized --kv")
    if suffix:
        if base == "fp16":
            raise KvjaxError(f"{name!r}: fp16 quantizes nothing to rotate; {suffix} applies to quantized policies")
        overrides["rotate"] = SUFFIXES[suffix]
    if controller is not None:
        if not family.takes_controller:
            raise KvjaxError(f"{name!r}: a controller applies to mixed-learned and mixed-random policies")
        overrides["controller"] = controller
    if allocation is not None:
        if not family.takes_allocation:
            raise KvjaxError(f"{name!r}: an allocation applies to learned-alloc policies")
        overrides["allocation"] = allocation
    canonical = (base if budget is None else f"{base}@{budget:g}") + suffix
    return family.make(canonical, budget, overrides)


def split_rotation(name: str) -> tuple[str, str]:
    """(`name` without its rotation suffix, the suffix or ""): `kivi2+rot` rotates keys and values,
    `+rotk` keys alone, `+rotv` values alone (kvjax.rotation.SUFFIXES)."""
    base, plus, suffix = name.partition("+")
    if plus and "+" + suffix not in SUFFIXES:
        raise KvjaxError(f"{name!r}: unknown suffix +{suffix}; known: {', '.join(SUFFIXES)} (rotated keys and "
                         "values, keys, values)")
    return base, plus + suffix


def policy_names() -> list[str]:
    """Every registered name, with @BITS where a budget is taken."""
    return [f.name + ("@BITS" if f.budget == "required" else "") for f in REGISTRY.values()]


def make_cache(policy: str | Policy, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32,
               kernels=kernel_choice.Kernels.AUTO, kv_dtype=None):
    """An empty cache of `policy` for `batch` sequences of up to `capacity` tokens each."""
    policy = get_policy(policy) if isinstance(policy, str) else policy
    return policy.make_cache(cfg, batch, capacity, dtype, kernels, kv_dtype)


def cache_bytes(policy: str | Policy, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32,
                kv_dtype=None) -> int:
    """Bytes an empty cache of `policy` holds (`make_cache`'s arguments), from its shapes alone: nothing is
    allocated or compiled (it is sized with the reference kernels; no size depends on the kernels, and
    `auto` would build the CPU kernel)."""
    policy = get_policy(policy) if isinstance(policy, str) else policy
    shapes = jax.eval_shape(lambda: policy.make_cache(cfg, batch, capacity, dtype, kernel_choice.Kernels.REFERENCE,
                                                      kv_dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
