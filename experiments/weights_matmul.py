"""The model's matrices alone: every layer's 7 projections and the head, for m activation rows, with
the weights dequantized to float32 (XLA's dot), kept in the GGUF's blocks (the C++ kernel), and kept
in blocks but dequantized by jnp for XLA's dot (the kernel's reference).

The default model is loaded twice (`weights="float32"` and `"native"`); one jitted scan over the 30
layers multiplies m rows by q, k, v, o, gate, up and down (each layer's activations feed the next, so
nothing is hoisted), then the head. Variants run in interleaved rounds (median ms), with the
multiply-adds per second each reaches.

    python experiments/weights_matmul.py --rows 1,4,8,16,32,48,64,256 [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.weights import BlockMatrix, linear
from pallas_kernels.cpu_bench import cpu_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference(w: BlockMatrix) -> BlockMatrix:
    """The same blocks, multiplied through jnp dequantization and XLA's dot."""
    return BlockMatrix(w.blocks, w.kind, kernel=False)


def program(params, head, num_layers: int):
    layers = params["layers"]
    stacked = {name: layers[name]["kernel"] for name in PROJECTIONS}
    floats = {n: w for n, w in stacked.items() if not isinstance(w, BlockMatrix)}

    @jax.jit
    def run(x):
        def body(x, layer):
            at = {n: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for n, w in floats.items()}
            mat = lambda n, h: linear(h, at[n] if n in at else stacked[n], layer)
            y = sum(mat(n, x).sum(-1, keepdims=True) for n in PROJECTIONS[:6])
            down = mat("down_proj", jnp.tile(x, (1, 3))[:, :stacked_in("down_proj")])
            return x + 1e-3 * (down + y), None

        x, _ = jax.lax.scan(body, x, jnp.arange(num_layers))
        return linear(x, head) if isinstance(head, BlockMatrix) else x @ head.T

    def stacked_in(name):
        w = stacked[name]
        return w.matrix_shape[-1] if isinstance(w, BlockMatrix) else w.shape[-2]

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,8,16,32,48,64,256")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    native, float32 = kvjax.load_model(weights="native"), kvjax.load_model(weights="float32")
    cfg = native.cfg
    table = native.params["embed"]["embedding"]
    ref_params = {"layers": {n: {"kernel": reference(native.params["layers"][n]["kernel"])} for n in PROJECTIONS}}
    variants = {"float32 (XLA dot)": program(float32.params, float32.params["embed"]["embedding"], cfg.num_layers),
                "blocks (kernel)": program(native.params, table, cfg.num_layers),
                "blocks (jnp + XLA)": program(ref_params, reference(table), cfg.num_layers)}
    macs = cfg.num_layers * sum(int(np.prod(native.params["layers"][n]["kernel"].matrix_shape[1:]))
                                for n in PROJECTIONS) + cfg.vocab_size * cfg.hidden_size
    print(f"{cpu_model()} | {os.cpu_count()} CPUs | jax {jax.__version__} | {cfg.name}: "
          f"{macs / 1e6:.0f} M multiply-adds a row", flush=True)
    print(f"{'rows':>5} " + " ".join(f"{name:>26}" for name in variants))
    for m in (int(r) for r in args.rows.split(",")):
        x = jnp.full((m, cfg.hidden_size), 0.01, jnp.float32)
        for run in variants.values():
            run(x).block_until_ready()
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                t0 = time.perf_counter()
                run(x).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        cells = [f"{1e3 * np.median(t):8.2f} ms {m * macs / np.median(t) / 1e9:6.1f} GMAC/s" for t in times.values()]
        print(f"{m:>5} " + " ".join(f"{c:>26}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
