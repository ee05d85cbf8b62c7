"""Controller training: expected distortion + lambda * expected bits, data-parallel, resumable.

  loss = mean_tokens sum_w pi(w | x) D(w)  +  lambda * mean_tokens sum_w pi(w | x) w

pi = softmax of the MLP's logits, D the trace's distortion rate (kvjax traces, normalized by
its training mean at 2 bits). lambda is a Lagrange multiplier updated by dual ascent in log
space, log lambda += lambda_lr * (expected bits - budget), so training settles near the
budget (it starts at `oracle_lambda`, where per-token argmin widths would meet it, since
a softmax pushed to saturation by a far-off lambda stops learning); afterwards `calibrate_bias` sets the per-bit logit bias so that argmax widths on
held-out text average the budget exactly (or just under it).

Optax AdamW with warmup + cosine decay and global-norm clipping. Data parallel: kvjax.sharding's
mesh (every device, or --devices); the batch is split over it, the state replicated, and XLA
inserts the gradient all-reduce. The batch of step s is a
pure function of (seed, s), so a run resumed from an Orbax checkpoint ends exactly where
an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from kvjax import sharding
from kvjax.controller import INPUTS, ControllerMLP, choose_widths, controller_inputs, corpus_rarity
from kvjax.layout import WIDTHS
from kvjax.errors import KvjaxError

BITS = np.asarray(WIDTHS, np.float32)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    budget_bits: float = 3.0
    steps: int = 2000
    batch: int = 4096
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    clip: float = 1.0
    hidden: tuple[int, ...] = (128, 128)
    lambda_init: float = 0.1  # the CLI starts from `oracle_lambda` of the training set
    lambda_lr: float = 0.01
    seed: int = 0
    checkpoint_every: int = 200


@dataclasses.dataclass
class Dataset:
    inputs: np.ndarray  # float32 [N, len(INPUTS)], normalized
    costs: np.ndarray  # float32 [N, 4]: distortion rate per width, / training mean at 2 bits
    weight: np.ndarray  # bool [N]: seen quantized by enough queries for a target


def prepare(traces: dict, counts: np.ndarray, min_queries: int, norm=None, scale=None):
    """Trace arrays -> (Dataset, (mean, std), scale). norm/scale from the training split when given."""
    raw = np.asarray(controller_inputs(jnp.asarray(traces["features"]), corpus_rarity(counts)))
    weight = traces["far_queries"] >= min_queries
    rate = traces["distortion"] / np.maximum(traces["far_queries"], 1)[:, None]
    if norm is None:
        if not weight.any():
            raise KvjaxError(f"no training token is seen quantized by {min_queries} queries: longer chunks needed")
        norm = (raw[weight].mean(0), raw[weight].std(0) + 1e-6)
        scale = float(rate[weight, 0].mean()) or 1.0
    inputs = ((raw - norm[0]) / norm[1]).astype(np.float32)
    return Dataset(inputs, (rate / scale).astype(np.float32), weight), norm, scale


def init_state(cfg: TrainConfig, tx):
    params = ControllerMLP(cfg.hidden).init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, len(INPUTS))))["params"]
    return {"params": params, "opt_state": tx.init(params), "log_lambda": jnp.float32(np.log(cfg.lambda_init)),
            "step": jnp.int32(0), "history": jnp.zeros((cfg.steps, 3), jnp.float32)}


def make_optimizer(cfg: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup, max(cfg.steps - 1, 1)),
                                                  max(cfg.steps, 2), end_value=cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train_step(state, inputs, costs, *, cfg: TrainConfig, tx):
    """One step on a batch: inputs [B, I], costs [B, 4] -> new state (history row = loss, distortion, bits)."""
    lam = jnp.exp(state["log_lambda"])

    def loss_fn(params):
        probs = jax.nn.softmax(ControllerMLP(cfg.hidden).apply({"params": params}, inputs), -1)
        dist = jnp.mean(jnp.sum(probs * costs, -1))
        bits = jnp.mean(probs @ BITS)
        return dist + lam * bits, (dist, bits)

    (loss, (dist, bits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    step = state["step"]
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "log_lambda": jnp.clip(state["log_lambda"] + cfg.lambda_lr * (bits - cfg.budget_bits), -12.0, 5.0),
            "step": step + 1, "history": state["history"].at[step].set(jnp.stack([loss, dist, bits]))}


def batch_indices(cfg: TrainConfig, step: int, n: int) -> np.ndarray:
    """The sample indices of step `step`: a pure function of (seed, step)."""
    return np.random.default_rng([cfg.seed, step]).integers(0, n, cfg.batch)


def sharded_step(cfg: TrainConfig, tx, mesh: Mesh):
    """train_step jitted with the batch split over the mesh's devices (kvjax.sharding), the state replicated."""
    if cfg.batch % mesh.size:
        raise KvjaxError(f"--batch {cfg.batch} is not a multiple of the {mesh.size} devices")
    replicated, by_batch = NamedSharding(mesh, sharding.REPLICATED), NamedSharding(mesh, sharding.ROWS)
    step = jax.jit(lambda s, x, c: train_step(s, x, c, cfg=cfg, tx=tx),
                   in_shardings=(replicated, by_batch, by_batch), out_shardings=replicated)
    return step, replicated, by_batch


class Interrupted(Exception):
    """Raised by `train(stop_after=...)`: a stand-in for a kill, for the resume test."""


def train(cfg: TrainConfig, data: Dataset, ckpt_dir: str, run_info: dict, mesh: Mesh | None = None,
          stop_after: int | None = None, progress: bool = True):
    """Trains (resuming from the latest checkpoint in ckpt_dir) -> final state (host arrays)."""
    mesh = mesh or sharding.make_mesh()
    tx = make_optimizer(cfg)
    step_fn, replicated, by_batch = sharded_step(cfg, tx, mesh)
    rows = np.flatnonzero(data.weight)
    ckpt_dir = os.path.abspath(ckpt_dir)
    _check_run(ckpt_dir, {**dataclasses.asdict(cfg), **run_info})
    state = init_state(cfg, tx)
    options = ocp.CheckpointManagerOptions(save_interval_steps=cfg.checkpoint_every, max_to_keep=2, create=True)
    with ocp.CheckpointManager(ckpt_dir, options=options) as mgr:
        latest = mgr.latest_step()
        if latest is not None:
            try:
                abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
                state = mgr.restore(latest, args=ocp.args.StandardRestore(abstract))
            except Exception as e:
                raise KvjaxError(f"checkpoint {ckpt_dir}/{latest} cannot be restored "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                 "delete the folder (or pass --fresh) to start over") from None
        state = jax.device_put(state, replicated)
        start = int(state["step"])
        with tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress) as bar:
            for s in range(start, cfg.steps):
                idx = rows[batch_indices(cfg, s, len(rows))]
                x = jax.device_put(data.inputs[idx], by_batch)
                c = jax.device_put(data.costs[idx], by_batch)
                state = step_fn(state, x, c)
                if stop_after is not None and s + 1 == stop_after:
                    raise Interrupted(f"stopped after step {s + 1}")
                if (s + 1) % cfg.checkpoint_every == 0 or s + 1 == cfg.steps:
                    mgr.save(s + 1, args=ocp.args.StandardSave(state), force=True)
                if (s + 1) % 50 == 0 or s + 1 == cfg.steps:
                    loss, dist, bits = np.asarray(state["history"][s])
                    bar.set_postfix(loss=f"{loss:.4f}", dist=f"{dist:.4f}", bits=f"{bits:.2f}",
                                    lam=f"{float(jnp.exp(state['log_lambda'])):.3g}")
                bar.update(1)
        mgr.wait_until_finished()
    return jax.device_get(state)


def _check_run(ckpt_dir: str, info: dict):
    """Checkpoints in ckpt_dir must come from the same settings and data (else a clear error)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, "run.json")
    info = json.loads(json.dumps(info))  # tuples -> lists
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            raise KvjaxError(f"{path} is damaged; delete {ckpt_dir} (or pass --fresh) to start over") from None
        if old != info:
            diff = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
            raise KvjaxError(f"checkpoints in {ckpt_dir} were made with other settings {diff}; "
                             "use another --out or pass --fresh")
    else:
        with open(path, "w") as f:
            json.dump(info, f, indent=1)


def logits_of(params, cfg: TrainConfig, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, x: ControllerMLP(cfg.hidden).apply({"params": p}, x))(params, inputs))


def oracle_lambda(costs: np.ndarray, budget: float, iters: int = 60) -> float:
    """The lambda at which per-token argmin_w cost_w + lambda * w averages `budget` bits (a good start)."""
    bits = lambda lam: float(np.mean(BITS[np.argmin(costs + lam * BITS, axis=1)]))
    lo, hi = 1e-8, 1e3
    for _ in range(iters):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if bits(mid) > budget else (lo, mid)
    return float(hi)


def calibrate_bias(logits: np.ndarray, budget: float, iters: int = 60) -> float:
    """The smallest per-bit bias whose argmax widths average at most `budget` bits."""
    bits = lambda b: float(np.mean(np.asarray(choose_widths(logits, b))))
    lo, hi = -1.0, 1.0
    for _ in range(40):
        if bits(lo) > budget:
            break
        lo *= 2
    for _ in range(40):
        if bits(hi) <= budget:
            break
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if bits(mid) > budget else (lo, mid)
    return hi


def evaluate(logits: np.ndarray, bias: float, data: Dataset) -> dict:
    """Held-out distortion and bits of the argmax widths, against random assignment at that histogram."""
    widths = np.asarray(choose_widths(logits, bias))
    col = np.searchsorted(BITS, widths)
    hist = {w: float(np.mean(widths == w)) for w in WIDTHS}
    w = data.weight
    dist = float(np.mean(data.costs[w, col[w]]))
    random = float(sum(hist[b] * data.costs[w, i].mean() for i, b in enumerate(WIDTHS)))
    return {"distortion": dist, "random_distortion": random, "bits": float(np.mean(widths)), "histogram": hist}
