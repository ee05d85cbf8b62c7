"""The benchmark commands run end to end on a tiny model and refuse bad input with one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import bench
from kvjax.config import get_preset
from kvjax.policies import cache_bytes, get_policy
from pallas_kernels import bench as kernel_bench


def test_preset_bench_runs_every_policy(capsys, tmp_path):
    out_json = tmp_path / "bench.jsonl"
    rc = bench.main(["--preset", "tiny", "--kv", "fp16,kivi2,mixed@3,int8-sink", "--group-size", "16",
                     "--contexts", "40", "--decode-steps", "2", "--repeats", "1", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["fp16", "kivi2", "mixed-static@3", "int8-sink"]
    assert all(r[1:4] == ["1", "40", "-"] and float(r[4]) > 0 for r in rows)
    records = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["kv"] for r in records] == ["fp16", "kivi2", "mixed-static@3", "int8-sink"]
    assert all(r["context"] == 40 and r["decode_ms_per_token"] > 0 and r["model"] == "random tiny" for r in records)


@pytest.mark.parametrize("policy", ["fp16", "kivi2", "mixed@3"])
def test_filled_cache_holds_the_context(policy):
    spec = get_policy(policy) if policy == "fp16" else get_policy(policy, window=8, group_size=4)
    cache = bench.filled_cache(jax.random.PRNGKey(0), policy=spec, cfg=get_preset("tiny"), batch=2,
                               context=37, capacity=45, dtype=jnp.float32)
    per_tier = {k: np.asarray(v) for k, v in cache.tokens_per_tier().items()}
    np.testing.assert_array_equal(sum(per_tier.values()), [37, 37])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [37, 37])
    empty = spec.make_cache(get_preset("tiny"), 2, 45, jnp.float32)  # stored as decoding stores it
    assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(cache)] == [
        (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(empty)]


@pytest.mark.parametrize("policy", ["fp16", "kivi2"])
def test_filled_cache_repeats_rows_beyond_fill_rows(policy):
    spec = get_policy(policy) if policy == "fp16" else get_policy(policy, window=8, group_size=4)
    batch = bench.FILL_ROWS + 3
    cache = bench.filled_cache(jax.random.PRNGKey(0), policy=spec, cfg=get_preset("tiny"), batch=batch,
                               context=37, capacity=45, dtype=jnp.float32)
    assert cache.nbytes == spec.make_cache(get_preset("tiny"), batch, 45, jnp.float32).nbytes
    np.testing.assert_array_equal(np.asarray(cache.lengths), [37] * batch)
    head = bench.filled_cache(jax.random.PRNGKey(0), policy=spec, cfg=get_preset("tiny"), batch=bench.FILL_ROWS,
                              context=37, capacity=45, dtype=jnp.float32)
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(head)):
        if a.shape != b.shape:  # batched: its rows repeat the first FILL_ROWS
            axis = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n][0]
            repeated = np.take(np.asarray(b), np.arange(batch) % bench.FILL_ROWS, axis=axis)
            np.testing.assert_array_equal(np.asarray(a), repeated)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["--preset", "tiny", "--kv", "kivi2"], "does not divide head_dim"),
    (["--preset", "tiny", "--kv", "kivi9"], "unknown KV-cache policy"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_kernel_bench_needs_a_gpu(capsys):
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: the kernel benchmark would run")
    assert kernel_bench.main(["--contexts", "1024"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["fp16", "kivi2", "mixed@3"])
def test_largest_batch_fits_the_kv_budget(policy):
    cfg, capacity, budget = get_preset("tiny"), 300, 3 * 2**20
    spec = get_policy(policy) if policy == "fp16" else get_policy(policy, group_size=16)
    batch = bench.largest_batch(spec, cfg, capacity, jnp.float32, budget)
    assert batch >= 1
    assert cache_bytes(spec, cfg, batch, capacity, jnp.float32) <= budget
    assert cache_bytes(spec, cfg, batch + 1, capacity, jnp.float32) > budget
    real = spec.make_cache(cfg, batch, capacity, jnp.float32)
    assert real.nbytes == cache_bytes(spec, cfg, batch, capacity, jnp.float32)


def test_kv_dtype_sets_the_16_bit_storage():
    """fp16 stores K/V in float16 under a float32 model unless --kv-dtype says otherwise."""
    cfg = get_preset("tiny")
    fp16 = get_policy("fp16")
    half = cache_bytes(fp16, cfg, 1, 64, jnp.float32)
    assert cache_bytes(fp16, cfg, 1, 64, jnp.float32, jnp.float32) == 2 * half - 4  # lengths: one int32
    assert bench.largest_batch(fp16, cfg, 64, jnp.float32, 2**20, jnp.float32) < bench.largest_batch(
        fp16, cfg, 64, jnp.float32, 2**20)
