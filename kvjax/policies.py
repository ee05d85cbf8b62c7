"""KV-cache policies by name, the precision policies of `mixed`, and tier capacities.

  fp16            every token in full precision (kvjax.cache.DenseCache)
  kivi2/4/8       KIVI: a 16-bit residual of the R newest tokens; older values per token and
                  keys per channel (whole groups of G tokens) in 2/4/8 bits
  int8-sink       selective quantization: S sink tokens + a window of W newest in 16 bits,
                  the middle int8 per token (symmetric, keys and values); int4-sink and
                  int2-sink are its 4- and 2-bit variants
  streaming       StreamingLLM: S sinks + W window, everything else evicted
  mixed           like KIVI, but each token leaving the residual gets a width in {2, 4, 8, 16}
                  from a precision policy under an average-bit budget (`mixed@3` = 3.0 bits):
                  static (`mixed@3`), rule (`mixed-rule@3`), learned (`mixed-learned@3`, and
                  plain `mixed`: the shipped controller, kvjax.controller) or random
                  (`mixed-random@3`: static assignment at the learned controller's histogram)
  band@B          widths by age: every token leaving the window is stored at 4 bits (KIVI) and
                  re-quantized to 2 bits once enough newer tokens have left; the 4-bit band holds
                  (B - 2) / 2 of the left tokens a full cache has, so a full cache averages B bits
                  (keys move in whole groups of G: group g is demoted when group g + n4/G starts)

A token leaves the 16-bit window when W newer tokens have arrived; a policy decides its
width then ("left" tokens). Tier capacities are static; when the preferred tier is full
the token goes to the nearest width (in log2 bits, ties to the wider) with room.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.errors import KvjaxError

WIDTHS = (2, 4, 8, 16)
EVICTED = 0  # width code of a token a streaming policy dropped
POLICY_NAMES = ("fp16", "kivi2", "kivi4", "kivi8", "int8-sink", "int4-sink", "int2-sink", "streaming", "mixed",
                "band")
PRECISIONS = ("static", "rule", "learned", "random")
CONTROLLED = ("learned", "random")  # precisions that need a controller
# Share of the bits above 2 that `mixed` spends on 16-, 8- and 4-bit tokens.
_UPGRADE_SHARES = {16: 0.2, 8: 0.3, 4: 0.5}


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A quantized cache policy (static under jit)."""

    name: str
    quant_widths: tuple[int, ...] = ()  # packed tiers
    symmetric: bool = False  # per-token symmetric keys and values (int8-sink)
    evict: bool = False  # streaming: tokens leaving the window are dropped
    sinks: int = 0  # S: the first S tokens stay in 16 bits
    window: int = 128  # W (KIVI's residual R): the newest tokens in 16 bits
    group_size: int = 32  # G
    budget_bits: float | None = None  # mixed, band: average bits of the tokens that left the window
    band: bool = False  # band: widths by age (a 4-bit band, then 2 bits), see the module docstring
    precision: str = "static"  # mixed: how preferred widths are chosen
    controller: object = None  # kvjax.controller.Controller for precision learned / random

    def __post_init__(self):
        for w in self.quant_widths:
            if w not in WIDTHS[:-1]:
                raise KvjaxError(f"{self.name}: width {w} is not one of {WIDTHS}")
        if self.window < 1 or self.sinks < 0:
            raise KvjaxError(f"{self.name}: window must be >= 1 and sinks >= 0")
        if self.group_size < 1:
            raise KvjaxError(f"{self.name}: group size must be >= 1, got {self.group_size}")
        if not self.symmetric and self.quant_widths and self.window % self.group_size:
            raise KvjaxError(f"{self.name}: residual R={self.window} is not a multiple of G={self.group_size}")
        if self.budget_bits is not None:
            if self.budget_bits < 2:
                raise KvjaxError(f"{self.name}: a budget of {self.budget_bits} bits is below 2 bits")
            limit = 4.0 if self.band else max_budget()
            if self.budget_bits > limit:
                raise KvjaxError(f"{self.name}: budget {self.budget_bits} bits is above {limit:.2f}")
        if self.precision not in PRECISIONS:
            raise KvjaxError(f"{self.name}: unknown precision policy {self.precision!r}; known: {PRECISIONS}")
        if self.mixed and (self.precision in CONTROLLED) != (self.controller is not None):
            raise KvjaxError(f"{self.name}: precision {self.precision!r} "
                             f"{'needs' if self.precision in CONTROLLED else 'takes no'} controller")
        if self.controller is not None and abs(self.controller.budget_bits - self.budget_bits) > 1e-6:
            raise KvjaxError(f"{self.name}: the controller was trained for {self.controller.budget_bits:g} bits, "
                             f"the policy asks for {self.budget_bits:g}")

    @property
    def mixed(self) -> bool:
        return self.budget_bits is not None and not self.band

    @property
    def uses_features(self) -> bool:
        """Whether widths depend on model outputs (then scoring runs block by block)."""
        return self.mixed and self.precision in ("rule", "learned")

    @property
    def tier_widths(self) -> tuple[int, ...]:
        """Widths with a tier of their own (16 = the dense tier of kept tokens)."""
        return self.quant_widths + ((16,) if self.mixed else ())

    def check(self, cfg: ModelConfig):
        """Checks the policy against the model's head dim and context."""
        h = cfg.head_dim
        if self.quant_widths and not self.symmetric and h % self.group_size:
            raise KvjaxError(f"{self.name}: G={self.group_size} does not divide head_dim={h}")
        for w in self.quant_widths:
            if (h * w) % 32:
                raise KvjaxError(f"{self.name}: head_dim={h} at {w} bits does not fill whole 32-bit words")
        if self.controller is not None:
            self.controller.check(cfg)
        if self.sinks + self.window > cfg.max_position_embeddings:
            raise KvjaxError(f"{self.name}: sinks + window = {self.sinks + self.window} exceeds the "
                             f"model's context of {cfg.max_position_embeddings} tokens")

    def has_left(self, positions, query_positions):
        """Whether tokens at `positions` have left the 16-bit window as seen from queries at
        `query_positions` (numpy or jnp, broadcast): not a sink, and at least W tokens older."""
        return (positions >= self.sinks) & (query_positions - positions >= self.window)

    def histogram(self) -> dict[int, float]:
        """Target share of left tokens per width; its mean width is the budget (band: in a full cache)."""
        if self.band:
            return {2: (4.0 - self.budget_bits) / 2.0, 4: (self.budget_bits - 2.0) / 2.0}
        if not self.mixed:
            return {w: 1.0 for w in self.quant_widths}
        if self.controller is not None:  # the controller's held-out histogram
            return dict(self.controller.histogram)
        extra = self.budget_bits - 2.0
        shares = {w: share * extra / (w - 2) for w, share in _UPGRADE_SHARES.items()}
        return {2: 1.0 - sum(shares.values()), **shares}

    def capacities(self, capacity: int) -> dict[int, int]:
        """Slots per tier for sequences of up to `capacity` tokens (multiples of G)."""
        left = max(capacity - self.sinks - self.window, 0)
        g = self.group_size
        round_up = lambda n: -(-n // g) * g
        if self.band:  # the 4-bit band (a ring of whole groups), then the demoted groups
            band = max(g, math.floor((self.budget_bits - 2.0) / 2.0 * left / g) * g)
            return {2: max(round_up(left) - band, 0), 4: band}
        if not self.mixed:
            return {w: round_up(left) for w in self.quant_widths}
        hist = self.histogram()
        caps = {w: round_up(math.floor(hist[w] * left)) for w in (4, 8, 16)}
        caps[2] = round_up(max(left - sum(caps.values()), 0))
        return {w: caps[w] for w in self.tier_widths}


def max_budget() -> float:
    """The largest budget whose histogram keeps a non-negative 2-bit share."""
    return 2.0 + 1.0 / sum(share / (w - 2) for w, share in _UPGRADE_SHARES.items())


def parse_policy(name: str, window: int | None = None, sinks: int | None = None,
                 group_size: int | None = None, budget_bits: float | None = None,
                 precision: str | None = None, controller=None) -> PolicySpec:
    """Parses a policy name (`kivi2`, `mixed@3`, `mixed-rule@3.5`, ...) with optional overrides.

    `controller` (a path or a kvjax.controller.Controller) is for precision learned / random;
    without one they use the controller shipped for the budget. Plain `mixed` (no budget in
    the name, no precision given) is the learned policy.
    """
    base, _, budget = name.partition("@")
    base, _, prec = base.partition("-") if base.startswith("mixed-") else (base, "", "")
    if base not in POLICY_NAMES:
        raise KvjaxError(f"unknown KV-cache policy {name!r}; known: {', '.join(POLICY_NAMES)}, "
                         "mixed@BITS, mixed-rule@BITS, mixed-learned@BITS, mixed-random@BITS, band@BITS")
    if budget:
        try:
            budget_bits = float(budget)
        except ValueError:
            raise KvjaxError(f"bad budget in {name!r}: {budget!r} is not a number") from None
    opts = {}
    if window is not None:
        opts["window"] = window
    if group_size is not None:
        opts["group_size"] = group_size
    if base.startswith("kivi"):
        spec = PolicySpec(name, quant_widths=(int(base[4:]),), sinks=sinks or 0, **opts)
    elif base.endswith("-sink"):
        spec = PolicySpec(name, quant_widths=(int(base[3]),), symmetric=True, sinks=4 if sinks is None else sinks,
                          **opts)
    elif base == "streaming":
        spec = PolicySpec(name, evict=True, sinks=4 if sinks is None else sinks, **opts)
    elif base == "band":
        if controller is not None or precision is not None:
            raise KvjaxError(f"{name!r}: a band policy takes no precision policy or controller")
        spec = PolicySpec(name, quant_widths=(2, 4), sinks=4 if sinks is None else sinks,
                          budget_bits=3.0 if budget_bits is None else budget_bits, band=True, **opts)
    elif base == "mixed":
        budget_bits = 3.0 if budget_bits is None else budget_bits
        prec = prec or precision or ("static" if budget else "learned")
        PolicySpec(name, budget_bits=budget_bits, **opts)  # budget errors before any controller loading
        if prec in CONTROLLED:
            from kvjax.controller import Controller, default_controller, load_controller
            if controller is None:
                controller = default_controller(budget_bits)
            elif not isinstance(controller, Controller):
                controller = load_controller(controller)
        elif controller is not None:
            raise KvjaxError(f"{name!r}: a controller applies to the learned and random precisions, not {prec!r}")
        spec = PolicySpec(name, quant_widths=(2, 4, 8), sinks=4 if sinks is None else sinks,
                          budget_bits=budget_bits, precision=prec,
                          controller=controller if prec in CONTROLLED else None, **opts)
    else:
        raise KvjaxError(f"{name!r} is the plain FP16 cache, not a quantized policy")
    if budget and spec.budget_bits is None:
        raise KvjaxError(f"{name!r}: only mixed and band policies take a bit budget")
    return spec


def takes_controller(name: str) -> bool:
    """Whether policy `name` reads a controller: mixed-learned@B, mixed-random@B and plain mixed."""
    base, _, budget = name.partition("@")
    return base in ("mixed-learned", "mixed-random") or (base == "mixed" and not budget)


# ----------------------------------------------------------------------------- precision


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


def preferred_widths(spec: PolicySpec, positions, features):
    """Preferred width of tokens leaving the window: positions [...], features [..., F]."""
    if spec.evict:
        return jnp.full(positions.shape, EVICTED, jnp.int32)
    if spec.band:  # every left token enters the 4-bit band
        return jnp.full(positions.shape, 4, jnp.int32)
    if not spec.mixed:
        return jnp.full(positions.shape, spec.quant_widths[0], jnp.int32)
    if spec.precision in ("static", "random"):  # random assignment at the target histogram
        return _quantile_width(_position_hash(positions), spec.histogram())
    if spec.precision == "learned":
        return spec.controller.widths(features)
    # rule: tokens the model was unsure after, or rare tokens, get more bits
    entropy, rarity = features[..., 0], features[..., 2]
    score = 0.5 * jnp.tanh(entropy / 4.0) + 0.5 * rarity
    return _quantile_width(jnp.clip(score, 0.0, 1.0 - 1e-6), spec.histogram())


def resolve_widths(spec: PolicySpec, preferred, counts, caps):
    """Nearest tier with room: preferred [b], counts [b, n] (per tier_widths), caps [n] -> width [b].

    Widths are tried by |log2(w) - log2(preferred)|, ties to the wider one. A band policy's
    4-bit tier is a ring that makes room by demoting, so its tokens always enter it.
    """
    tiers = spec.tier_widths
    if not tiers or spec.band:
        return preferred
    width = jnp.zeros_like(preferred)
    for pref in tiers:
        order = sorted(tiers, key=lambda w: (abs(math.log2(w) - math.log2(pref)), -w))
        chosen = jnp.zeros_like(preferred)
        for w in reversed(order):  # the first in `order` with room wins
            i = tiers.index(w)
            chosen = jnp.where(counts[:, i] < caps[i], w, chosen)
        width = jnp.where(preferred == pref, chosen, width)
    return width


def add_policy_flags(parser):
    """The command-line flags that pick and tune a KV-cache policy (see `policy_from_flags`)."""
    parser.add_argument("--kv", default="fp16",
                        help="KV-cache policy: fp16, kivi2, kivi4, kivi8, int8-sink, int4-sink, int2-sink, "
                             "streaming, mixed (learned controller), mixed@BITS, mixed-rule@BITS, "
                             "mixed-learned@BITS, mixed-random@BITS, band@BITS (4-bit band, then 2 bits)")
    parser.add_argument("--budget-bits", type=float, default=None, help="mixed, band: average bits (default 3.0)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help="mixed: precision policy")
    parser.add_argument("--controller", default=None,
                        help="mixed learned/random: a controller file (default: the one shipped for the budget)")
    parser.add_argument("--residual", type=int, default=None,
                        help="16-bit window W / KIVI residual R (default 128)")
    parser.add_argument("--group-size", type=int, default=None, help="quantization group size G (default 32)")
    parser.add_argument("--sinks", type=int, default=None, help="attention-sink tokens kept in 16 bits")


def policy_from_flags(args) -> str | PolicySpec:
    """'fp16' or the PolicySpec that `add_policy_flags`' flags describe."""
    tuned = any(x is not None for x in (args.budget_bits, args.precision, args.residual, args.group_size,
                                         args.sinks, args.controller))
    if args.kv == "fp16":
        if tuned:
            raise KvjaxError("--budget-bits/--precision/--controller/--residual/--group-size/--sinks "
                             "need a quantized --kv")
        return "fp16"
    spec = parse_policy(args.kv, window=args.residual, sinks=args.sinks, group_size=args.group_size,
                        budget_bits=args.budget_bits, precision=args.precision, controller=args.controller)
    if args.budget_bits is not None and spec.budget_bits is None:
        raise KvjaxError(f"--budget-bits applies to mixed and band policies, not {args.kv!r}")
    if (args.precision is not None or args.controller is not None) and not spec.mixed:
        raise KvjaxError(f"--precision and --controller apply to mixed policies, not {args.kv!r}")
    return spec


def tier_onehot(spec: PolicySpec, width):
    """width int32 [b] -> bool [b, len(spec.tier_widths)]: the tier each token enters (none: all False)."""
    if not spec.tier_widths:
        return jnp.zeros((width.shape[0], 0), bool)
    return jnp.stack([width == w for w in spec.tier_widths], axis=1)


def make_cache(policy: str | PolicySpec, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32):
    """An empty cache of `policy` for `batch` sequences of up to `capacity` tokens each."""
    from kvjax.cache import DenseCache
    from kvjax.tiered import TieredCache

    if policy == "fp16":
        return DenseCache.init(cfg, batch, capacity, dtype)
    spec = policy if isinstance(policy, PolicySpec) else parse_policy(policy)
    return TieredCache.init(spec, cfg, batch, capacity, dtype)
