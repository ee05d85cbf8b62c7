"""kvjax.sharding: rows split over a mesh give what one device gives.

The many-device checks run in a subprocess with 8 CPU devices forced (XLA_FLAGS must be set
before jax starts), on the default model: greedy and sampled tokens from `generate`, per-segment
NLL from eval.perplexity and per-pair log-likelihoods from eval.scoring, and the first steps of
allocation training (a tiny random model), each against one device.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import sharding
from kvjax.config import get_preset
from kvjax.errors import KvjaxError
from kvjax.policies import get_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_preset("SmolLM2-135M")  # shapes only (eval_shape)


@pytest.mark.parametrize("name", ["fp16", "kivi2", "int8-sink", "streaming", "learned-alloc@2.5", "mixed-learned@3"])
def test_every_cache_leaf_is_split_by_its_row_axis(name):
    policy = get_policy(name)
    specs = sharding.row_specs(lambda b: policy.make_cache(CFG, b, 300, jnp.float32, "reference"))
    cache = jax.eval_shape(lambda: policy.make_cache(CFG, 3, 300, jnp.float32, "reference"))
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                          jax.tree.leaves(cache)):
        rows = [i for i, axis in enumerate(spec) if axis == sharding.DATA]
        assert len(rows) == 1 and leaf.shape[rows[0]] == 3, (spec, leaf.shape)


def test_one_device_runs_as_before():
    mesh = sharding.make_mesh(1)
    fn = lambda x: x + 1
    assert sharding.per_device(fn, mesh, sharding.ROWS, sharding.ROWS) is fn
    tree = {"a": np.zeros(3)}
    assert sharding.place(tree, mesh, sharding.ROWS) is tree and sharding.replicate(tree, mesh) is tree
    assert [sharding.padded(n, mesh) for n in (1, 5)] == [1, 5]
    assert sharding.describe(mesh) == f"1 {jax.devices()[0].platform} device"


def test_more_devices_than_the_machine_has_is_one_error():
    with pytest.raises(KvjaxError, match="this machine has"):
        sharding.make_mesh(jax.device_count() + 1)


def test_no_coordinator_no_distributed_start(monkeypatch):
    for name in (sharding.COORDINATOR, "KVJAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize() is False


EIGHT_DEVICES = textwrap.dedent("""
    import jax, numpy as np
    import kvjax
    from eval.perplexity import segments_nll
    from eval.scoring import score_tokens
    from kvjax import sharding
    from kvjax.generation import generate
    from kvjax.sampling import SamplingConfig

    assert jax.device_count() == 8, jax.devices()
    one, eight = sharding.make_mesh(1), sharding.make_mesh(8)
    model = kvjax.load_model()
    story = "A cache keeps the keys and values of every token it has seen. " * 16  # ~230 tokens: past the window
    prompts = [story + "The capital of France is", "Water boils at", story[:400] + "One, two, three,"]
    for kv in ("fp16", "kivi2", "learned-alloc@2.5"):
        a, b = (generate(model, prompts, 6, kv=kv, mesh=m) for m in (one, eight))
        assert a.tokens == b.tokens, (kv, a.tokens, b.tokens)
        assert "8 cpu devices" in b.stats_line() and b.rows == 8 and len(b.texts) == 3
    hot = SamplingConfig(temperature=0.9, top_p=0.95)
    a, b = (generate(model, prompts, 6, sampling=hot, seed=3, kv="kivi2", mesh=m) for m in (one, eight))
    assert a.tokens == b.tokens, ("sampled", a.tokens, b.tokens)

    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (3, 200)).astype(np.int32)
    for kv in ("fp16", "kivi2"):
        policy = kvjax.get_policy(kv)
        (n1, l1), (n8, l8) = (segments_nll(model.params, model.cfg, ids, policy, mesh=m) for m in (one, eight))
        np.testing.assert_allclose(n1, n8, atol=1e-5)
        assert all(np.array_equal(x, y) for x, y in zip(l1, l8))
    pairs = [(list(ids[i, :30 + 20 * i]), list(ids[i, 100:103 + i])) for i in range(3)]
    s1, s8 = (score_tokens(model, pairs, "kivi2", batch_size=2, mesh=m) for m in (one, eight))
    np.testing.assert_allclose([s[0] for s in s1], [s[0] for s in s8], atol=1e-5)
    assert [s[1] for s in s1] == [s[1] for s in s8]

    import types
    from kvjax.config import get_preset
    from kvjax.model import init_params
    from train_controller import allocate
    tiny = get_preset("tiny")
    small = types.SimpleNamespace(cfg=tiny, params=init_params(tiny, jax.random.PRNGKey(0)))
    segments = list(np.random.default_rng(1).integers(0, tiny.vocab_size, (4, 40)).astype(np.int32))
    thetas = [allocate.train(small, segments, 3.0, steps=2, sinks=2, window=8, group_size=4, batch=8, mesh=m,
                             log=lambda s: None)[0] for m in (one, eight)]
    np.testing.assert_allclose(thetas[0], thetas[1], atol=1e-4)  # the gradient summed in another order
    print("ok")
""")


def test_eight_devices_give_what_one_gives():
    """generate (fp16, kivi2, learned-alloc@2.5: greedy; kivi2 sampled), segment NLLs and pair
    scores on the default model, and two steps of allocation training on a tiny one: 8 forced CPU
    devices against 1."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True, text=True,
                            timeout=1200, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


TWO_HOSTS = textwrap.dedent("""
    import json, jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives between processes
    from kvjax import sharding
    assert sharding.initialize() and jax.process_count() == 2 and jax.device_count() == 4
    import kvjax
    from eval.perplexity import segments_nll
    from kvjax.generation import generate
    model = kvjax.load_model()
    mesh = sharding.make_mesh()
    texts = generate(model, PROMPTS, 6, kv="kivi2", mesh=mesh).texts
    nll, _ = segments_nll(model.params, model.cfg, np.asarray(SEGMENTS, np.int32), kvjax.get_policy("kivi2"),
                          mesh=mesh)
    print(json.dumps({"texts": texts, "nll": nll.tolist()}))
""")


def test_two_hosts_give_what_one_device_gives():
    """Two processes of 2 CPU devices each, joined through jax.distributed (the environment a
    multi-host run sets), split the rows over all 4 devices; each gets the whole result."""
    import json
    import socket

    import kvjax
    from eval.perplexity import segments_nll
    from kvjax.generation import generate

    prompts = ["The capital of France is", "Water boils at", "One, two, three,"]
    segments = np.random.default_rng(0).integers(0, 49152, (3, 160)).tolist()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = f"PROMPTS, SEGMENTS = {prompts!r}, {segments!r}\n" + TWO_HOSTS
    runs = []
    for index in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(index),
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        runs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    model = kvjax.load_model()
    texts = generate(model, prompts, 6, kv="kivi2").texts
    nll, _ = segments_nll(model.params, model.cfg, np.asarray(segments, np.int32), kvjax.get_policy("kivi2"))
    for out, _ in outs:
        got = json.loads(out.strip().splitlines()[-1])
        assert got["texts"] == texts
        np.testing.assert_allclose(got["nll"], nll, atol=1e-5)
