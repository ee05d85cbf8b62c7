"""Learns a bit allocation: widths in {2, 4, 8, 16} per (layer, keys/values, age band), under a budget.

  python -m train_controller.allocate --budget 2.5 --out kvjax/allocations/smollm2-135m-instruct-2.5bits.json

The "Don't Waste Bits" idea at the granularity where the signal is (docs/EXPERIMENTS.md): one
categorical variable per unit u = (layer, side, band) with logits theta[u, w]. Each step runs the
model teacher-forced over a segment of calibration text (the Sherlock training part; never an
evaluation text) with every unit's K/V replaced by a straight-through Gumbel-softmax choice among
its quantized forms (`RelaxedCache`: KIVI round trips at 2, 4, 8 bits, or the 16-bit K/V), and
minimizes

  loss = KL(p_fp16 || p_quantized) per predicted token  +  lambda * expected average bits

with Optax Adam on theta; lambda is a Lagrange multiplier set by dual ascent so the expected bits
meet the budget. The distortion is next-token KL against the FP16 trace (measured to track
perplexity better than attention-output error: docs/EXPERIMENTS.md). The discrete allocation is
the argmax, made non-increasing with age (a band's tokens are re-encoded from the band before it,
so a wider later band would buy nothing), then fitted to the budget greedily by logit margin per
bit: at most the budget, as close to it as single steps allow.

The relaxation sees band boundaries by age (tokens past the window, per band the slots the real
`Bands` policy gives it at the training context) and quantizes every token from its 16-bit K/V;
the exact teacher-forced scorer (kvjax.teacher_forced) is what judges the result.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jax.sharding import NamedSharding

from kvjax import cli, sharding, teacher_forced
from kvjax.allocation import Allocation, save_allocation
from kvjax.attention import MASK_VALUE, causal_mask, grouped_output, grouped_scores
from kvjax.cache import KVCache
from kvjax.errors import KvjaxError
from kvjax.flags import add_devices_flag, add_weights_flag, mesh_from_flags, weights_from_flags
from kvjax.layout import CODE_WIDTHS, DEFAULT_GROUP, DEFAULT_SINKS, DEFAULT_WINDOW, WIDTHS  # WIDTHS: last axis order
from kvjax.loading import load_model
from kvjax.model import forward
from kvjax.policies import Bands, get_policy
from kvjax.rotation import NONE, ROTATIONS, Rotation
from kvjax.stores import KiviKeys, KiviValues
from train_controller.data import check_training_text, training_ids

DEFAULT_SHARES = (0.125, 0.375)  # newest 1/8 of the left tokens, the next 3/8, the oldest half
# sinks + window + a group of left tokens, and one more to predict, at the defaults the command trains with
MIN_CONTEXT = DEFAULT_SINKS + DEFAULT_WINDOW + DEFAULT_GROUP + 1


@struct.dataclass
class RelaxedCache(KVCache):
    """A single-pass cache whose units read a weighted mix of their K/V's quantized forms.

    weights [l, 2, bands, 4]: per layer, side (keys, values), age band, the weight of each width in
    WIDTHS (one-hot in the forward pass when straight-through). Tokens that are sinks or within W
    of the query are read in 16 bits, as in every band policy.
    """

    weights: jax.Array
    lengths: jax.Array
    band_ends: tuple[int, ...] = struct.field(pytree_node=False)  # per band, its last age past W (+1)
    sinks: int = struct.field(pytree_node=False)
    window: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    num_layers: int = struct.field(pytree_node=False)
    rotation: Rotation = struct.field(pytree_node=False, default=NONE)  # as the policy will store its K/V

    @property
    def segments(self):
        return ((0, self.num_layers),)

    def attend(self, layer, q, k, v, positions):
        attend = functools.partial(relaxed_attention, band_ends=self.band_ends, sinks=self.sinks,
                                   window=self.window, group_size=self.group_size)
        return jax.checkpoint(attend)(q, k, v, positions, self.weights[layer.index]), self


def quantized_forms(keys, values, sinks: int, group_size: int, dtype=jnp.float16):
    """{width: (keys, values)} float32 [b, k, T, h]: KIVI round trips (key groups of G from the first
    non-sink token), and the 16-bit K/V at 16."""
    keys, values = keys.astype(dtype), values.astype(dtype)
    T = keys.shape[2]
    n = T - sinks
    pad = -(-n // group_size) * group_size - n
    tail = jnp.pad(keys[:, :, sinks:], ((0, 0), (0, 0), (0, pad), (0, 0)))
    head = keys[:, :, :sinks].astype(jnp.float32)
    forms = {16: (keys.astype(jnp.float32), values.astype(jnp.float32))}
    for w in CODE_WIDTHS:
        kq = KiviKeys.roundtrip(tail, w, group_size, dtype)[:, :, :n]
        forms[w] = (jnp.concatenate([head, kq], axis=2), KiviValues.roundtrip(values, w, group_size, dtype))
    return forms


def relaxed_attention(q, k, v, positions, weights, band_ends, sinks, window, group_size):
    """q [b, t, n, h], k, v [b, t, k, h] of a whole sequence, weights [2, bands, 4] -> [b, t, n, h]."""
    forms = quantized_forms(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), sinks, group_size)
    qp, kp = positions[:, :, None], positions[:, None, :]
    past = qp - kp - window  # ages past the window [b, t, T]
    dense = (kp < sinks) | (past < 0)
    starts = (0,) + band_ends[:-1]
    bands = [~dense & (past >= s) & (past < e) for s, e in zip(starts, band_ends)]

    def mix(side, i, w):  # [b, 1, 1, t, T]: the weight of width w for each (query, key)
        m = dense.astype(jnp.float32) * (w == 16)
        for b, band in enumerate(bands):
            m = m + band * weights[side, b, i]
        return m[:, None, None]

    scores = sum(grouped_scores(q, forms[w][0]) * mix(0, i, w) for i, w in enumerate(WIDTHS))
    probs = jax.nn.softmax(jnp.where(causal_mask(positions, positions)[:, None, None], scores, MASK_VALUE), axis=-1)
    out = sum(grouped_output(probs * mix(1, i, w), forms[w][1], jnp.float32) for i, w in enumerate(WIDTHS))
    return out.astype(q.dtype)


def band_ends(policy: Bands, cfg, context: int) -> tuple[int, ...]:
    """Cumulative slots of the policy's bands at this context (the last band open-ended)."""
    tiers = policy.tiers(cfg, max(context - policy.sinks - policy.window, 0))
    ends = tuple(int(x) for x in np.cumsum([t.slots for t in tiers]))
    return ends[:-1] + (1 << 30,)


def expected_bits(theta, shares):
    """Expected average bits over layers, sides and bands (weighted by band share): theta [l, 2, B, 4]."""
    probs = jax.nn.softmax(theta, axis=-1)
    per_unit = probs @ jnp.asarray(WIDTHS, jnp.float32)  # [l, 2, B]
    return (per_unit * jnp.asarray(shares)[None, None]).sum(-1).mean()


def initial_logits(num_layers, bands, budget):
    """Logits of one distribution p(w) ~ exp(-beta w) for every unit, with mean width = budget."""
    w = np.asarray(WIDTHS, np.float64)
    mean = lambda beta: (w * np.exp(-beta * (w - 2))).sum() / np.exp(-beta * (w - 2)).sum()
    lo, hi = -5.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) > budget else (lo, mid)
    logits = -lo * (w - 2)
    return np.broadcast_to(logits, (num_layers, 2, bands, 4)).astype(np.float32).copy()


def discrete_allocation(theta: np.ndarray, shares, budget: float) -> np.ndarray:
    """Width indices [l, 2, B]: argmax, non-increasing with age, fitted to the budget by logit margin per bit."""
    L, _, B, _ = theta.shape
    idx = theta.argmax(-1)
    for b in range(1, B):
        idx[:, :, b] = np.minimum(idx[:, :, b], idx[:, :, b - 1])
    widths = np.asarray(WIDTHS, np.float64)
    share = np.asarray(shares, np.float64)
    bits = lambda ix: float((widths[ix] * share[None, None]).sum(-1).mean())

    def moves(ix, step):  # (cost per bit, unit) of moving one unit one width down (-1) or up (+1)
        out = []
        for l in range(L):
            for s in range(2):
                for b in range(B):
                    j = ix[l, s, b] + step
                    if not 0 <= j < len(WIDTHS):
                        continue
                    if step < 0 and b + 1 < B and ix[l, s, b + 1] > j:
                        continue  # a later band would become wider
                    if step > 0 and b > 0 and ix[l, s, b - 1] < j:
                        continue
                    dbits = abs(widths[j] - widths[ix[l, s, b]]) * share[b]
                    gain = theta[l, s, b, j] - theta[l, s, b, ix[l, s, b]]
                    out.append((-gain * step / dbits, (l, s, b), j))  # demote: logit lost per bit saved
        return sorted(out)

    while bits(idx) > budget + 1e-9:
        _, (l, s, b), j = moves(idx, -1)[0]
        idx[l, s, b] = j
    improved = True
    while improved:  # promotions that still fit, best first
        improved = False
        for _, (l, s, b), j in moves(idx, +1):
            trial = idx.copy()
            trial[l, s, b] = j
            if bits(trial) <= budget + 1e-9:
                idx, improved = trial, True
                break
    return idx


def teacher_logprobs(params, cfg, segments):
    """FP16-cache log-probabilities [T, v] of each segment (exact teacher-forced path)."""
    fp16 = get_policy("fp16")
    out = []
    for seg in segments:
        ids = jnp.asarray(seg, jnp.int32)[None]
        pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        logits, _ = teacher_forced.score(params, cfg, ids, pos, fp16, ids.shape[1])
        out.append(np.asarray(jax.nn.log_softmax(logits[0], axis=-1)))
    return out


def train(model, segments, budget: float, shares=DEFAULT_SHARES, steps: int = 30, lr: float = 0.1,
          lambda_init: float = 0.02, lambda_lr: float = 0.01, tau=(1.0, 0.2), seed: int = 0,
          sinks: int = DEFAULT_SINKS, window: int = DEFAULT_WINDOW, group_size: int = DEFAULT_GROUP,
          rotate: str = "none", batch: int = 1, mesh=None, log=print):
    """Trains theta [l, 2, B, 4] on the segments (int32 arrays of one length), for a policy that stores its
    K/V rotated as `rotate` says (kvjax.rotation); returns (theta, history). Each step reads `batch`
    segments, split over the devices of `mesh` (kvjax.sharding; theta replicated, the gradient averaged
    by XLA)."""
    if batch % sharding.size(mesh):
        raise KvjaxError(f"--batch {batch} is not a multiple of the {sharding.size(mesh)} devices")
    cfg, params = model.cfg, model.params
    context = len(segments[0])
    shape_policy = Bands("shape", bands=((2, 2),) * (len(shares) + 1), shares=tuple(shares), sinks=sinks,
                         window=window, group_size=group_size)
    shape_policy.check(cfg)  # G divides the head dimension: before the teacher's pass
    ends = band_ends(shape_policy, cfg, context)
    all_shares = tuple(shares) + (1.0 - sum(shares),)
    teacher = teacher_logprobs(params, cfg, segments)
    first = sinks + window  # earlier predictions read nothing quantized

    def loss_fn(theta, params, lam, ids, logp, key, temperature):  # ids [b, T], logp [b, T, v]
        soft = jax.nn.softmax((theta + jax.random.gumbel(key, theta.shape)) / temperature, axis=-1)
        hard = jax.nn.one_hot(soft.argmax(-1), len(WIDTHS))
        weights = hard + soft - jax.lax.stop_gradient(soft)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        cache = RelaxedCache(weights, jnp.zeros((ids.shape[0],), jnp.int32), ends, sinks, window, group_size,
                             cfg.num_layers, Rotation.named(rotate))
        logits, _ = forward(params, cfg, ids, pos, cache)
        logq = jax.nn.log_softmax(logits[:, first:], axis=-1)
        p = logp[:, first:]
        kl = (jnp.exp(p) * (p - logq)).sum(-1).mean()
        bits = expected_bits(theta, all_shares)
        return kl + lam * bits, (kl, bits)

    opt = optax.adam(lr)
    laid_out = {}  # one device: as before
    if sharding.size(mesh) > 1:  # the segments' rows split over the devices, the rest replicated
        same, rows = NamedSharding(mesh, sharding.REPLICATED), NamedSharding(mesh, sharding.ROWS)
        laid_out = dict(in_shardings=(same,) * 4 + (rows, rows, same, same), out_shardings=same)
    params = sharding.replicate(params, mesh)

    @functools.partial(jax.jit, **laid_out)
    def step(theta, opt_state, params, lam, ids, logp, key, temperature):  # params an argument: not a constant
        (_, (kl, bits)), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta, params, lam, ids, logp, key,
                                                                          temperature)
        updates, opt_state = opt.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, kl, bits

    theta = jnp.asarray(initial_logits(cfg.num_layers, len(all_shares), budget))
    opt_state, lam = opt.init(theta), lambda_init
    rng, history = np.random.default_rng(seed), []
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    for s in range(steps):
        i = rng.integers(len(segments), size=batch)
        temperature = tau[0] * (tau[1] / tau[0]) ** (s / max(steps - 1, 1))
        key, sub = jax.random.split(key)
        ids, logp = np.stack([segments[j] for j in i]).astype(np.int32), np.stack([teacher[j] for j in i])
        theta, opt_state, kl, bits = step(theta, opt_state, params, jnp.float32(lam), ids, logp, sub,
                                          jnp.float32(temperature))
        kl, bits = float(kl), float(bits)
        lam = max(0.0, lam + lambda_lr * (bits - budget))
        history.append({"step": s, "kl": kl, "expected_bits": bits, "lambda": lam, "tau": temperature})
        if s % 10 == 0 or s == steps - 1:
            log(f"step {s:4d}  KL {kl:.4f}  expected bits {bits:.3f}  lambda {lam:.4f}  tau {temperature:.2f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    return np.asarray(theta), history


def to_allocation(theta, shares, budget, sinks=DEFAULT_SINKS, window=DEFAULT_WINDOW, group_size=DEFAULT_GROUP,
                  trained=None, rotate: str = "none") -> Allocation:
    idx = discrete_allocation(theta, tuple(shares) + (1.0 - sum(shares),), budget)
    widths = np.asarray(WIDTHS)[idx]  # [l, 2, B]
    keys = tuple(tuple(int(w) for w in widths[:, 0, b]) for b in range(widths.shape[2]))
    values = tuple(tuple(int(w) for w in widths[:, 1, b]) for b in range(widths.shape[2]))
    return Allocation(keys, values, tuple(shares), sinks, window, group_size, rotate, trained)


def _parser():
    p = cli.ArgumentParser(prog="python -m train_controller.allocate", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, required=True, help="average bits of the left tokens' K/V (2 < B < 16)")
    p.add_argument("--out", required=True, type=cli.output_file, help="where to write the allocation (JSON)")
    p.add_argument("--context", type=cli.at_least(MIN_CONTEXT), default=1024, help="tokens per training segment")
    p.add_argument("--segments", type=cli.at_least(1), default=8, help="segments of the calibration text")
    p.add_argument("--steps", type=cli.at_least(1), default=30, help="Adam steps")
    p.add_argument("--batch", type=cli.at_least(1), default=1,
                   help="segments per step, split over the devices (a multiple of them)")
    p.add_argument("--lr", type=cli.above(0.0), default=0.1, help="Adam learning rate on the width logits")
    p.add_argument("--lambda-lr", type=cli.above(0.0), default=0.01,
                   help="dual ascent step of lambda per bit over the budget")
    p.add_argument("--shares", default=",".join(map(str, DEFAULT_SHARES)),
                   help="age bands but the oldest: their shares of the left tokens, newest first")
    p.add_argument("--seed", type=int, default=0, help="segment order and Gumbel noise")
    p.add_argument("--window", type=cli.at_least(1), default=DEFAULT_WINDOW,
                   help=f"16-bit window W the allocation is trained and stored for (default {DEFAULT_WINDOW})")
    p.add_argument("--group-size", type=cli.at_least(1), default=DEFAULT_GROUP,
                   help=f"quantization group G the allocation is trained and stored for (default {DEFAULT_GROUP})")
    p.add_argument("--rotate", default="none", choices=ROTATIONS,
                   help="train for a policy that stores these sides Hadamard-rotated (kvjax.rotation; learned-alloc@B"
                        "+rot takes an allocation trained with both)")
    p.add_argument("--model", default=None, help="GGUF / HF folder (default: the embedded SmolLM2-135M-Instruct)")
    add_weights_flag(p)
    add_devices_flag(p)
    p.add_argument("--text", default=None, help="calibration text file (default: the Sherlock training part)")
    return p


def main(argv=None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        shares = tuple(float(x) for x in args.shares.split(",") if x.strip())
    except ValueError:
        raise KvjaxError(f"--shares: not a list of numbers: {args.shares!r}") from None
    if not 2.0 < args.budget < 16.0:
        raise KvjaxError(f"--budget must be in (2, 16), got {args.budget:g}")
    if any(s <= 0 for s in shares) or sum(shares) >= 1:
        raise KvjaxError(f"--shares must be positive and sum to less than 1, got {args.shares}")
    mesh = mesh_from_flags(args)
    if args.batch % mesh.size:
        raise KvjaxError(f"--batch {args.batch} is not a multiple of the {mesh.size} devices")
    held = weights_from_flags(args, differentiable=True)
    check_training_text(args.text)
    model = load_model(args.model, weights=held)
    ids = training_ids(model.tokenizer, args.text, max_tokens=args.context * args.segments)
    if len(ids) < args.context * args.segments:
        raise KvjaxError(f"the calibration text has {len(ids)} tokens, fewer than {args.context} x {args.segments}")
    segments = [ids[i * args.context:(i + 1) * args.context] for i in range(args.segments)]
    theta, history = train(model, segments, args.budget, shares, args.steps, args.lr, lambda_lr=args.lambda_lr,
                           seed=args.seed, window=args.window, group_size=args.group_size, rotate=args.rotate,
                           batch=args.batch, mesh=mesh, log=cli.say)
    trained = {"budget_bits": args.budget, "context": args.context, "segments": args.segments, "steps": args.steps,
               "batch": args.batch,
               "lr": args.lr, "seed": args.seed, "text": args.text or "sherlock-train",
               "final_kl": history[-1]["kl"], "final_lambda": history[-1]["lambda"],
               "logits": np.round(theta, 4).tolist()}
    alloc = to_allocation(theta, shares, args.budget, window=args.window, group_size=args.group_size, trained=trained,
                          rotate=args.rotate)
    save_allocation(alloc, args.out)
    print(f"{args.out}: {alloc.average_bits:.3f} average bits; keys per band "
          + " | ".join(" ".join(map(str, k)) for k in alloc.keys)
          + "; values per band " + " | ".join(" ".join(map(str, v)) for v in alloc.values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
