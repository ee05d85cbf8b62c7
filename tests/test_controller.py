"""The learned controller: training smoke test on the tiny model, resume after a kill, the sharded
step equal to the single-device step, and clear errors for bad controller files and checkpoints."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import teacher_forced
from kvjax.controller import INPUTS, load_controller, save_controller
from kvjax.errors import KvjaxError
from kvjax.loading import load_model
from kvjax.policies import get_policy
from train_controller import train
from train_controller.__main__ import main

TINY_FLAGS = ["--chunk", "64", "--residual", "8", "--group-size", "4", "--sinks", "2", "--min-queries", "4",
              "--batch", "16", "--hidden", "16,16", "--trace-tokens", "640"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then it ran to the dog who was not happy about that at all".split()
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(rng.choice(words, 400)))
    return str(path)


def test_cli_one_step_trains_a_controller_that_the_policy_uses(tiny_checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", tiny_checkpoint.hf_folder, "--text", text_file, "--out", str(out), "--steps", "1",
            "--budget-bits", "3", *TINY_FLAGS]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("held-out distortion") and "average bits" in last and "histogram" in last
    assert (out / "loss.png").stat().st_size > 0 and len(list((out / "traces").glob("chunk-*.npz"))) == 10
    ctrl = load_controller(str(out / "controller.npz"))
    assert ctrl.budget_bits == 3.0 and sum(ctrl.histogram.values()) == pytest.approx(1.0)
    assert sum(w * s for w, s in ctrl.histogram.items()) <= 3.0 + 1e-6  # the bias meets the budget

    model = load_model(tiny_checkpoint.hf_folder)
    spec = get_policy("mixed-learned@3", window=8, group_size=4, controller=str(out / "controller.npz"))
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % 200
    logits, _ = teacher_forced.score(model.params, model.cfg, tokens, jnp.arange(40)[None], spec, 40)
    assert np.isfinite(np.asarray(logits)).all()
    # the traces are reused: a second run does not recompute them, and resumes training at its end
    assert main(argv) == 0


def _random_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    costs = np.abs(rng.standard_normal((n, 4))).astype(np.float32) * np.asarray([1, 0.1, 0.01, 0], np.float32)
    return train.Dataset(rng.standard_normal((n, len(INPUTS))).astype(np.float32), costs, np.ones(n, bool))


CFG = train.TrainConfig(steps=6, batch=16, hidden=(8, 8), checkpoint_every=2, warmup=2)


def test_training_resumes_after_a_kill_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    data = _random_data()
    whole = train.train(CFG, data, str(tmp_path / "a"), {}, progress=False)
    with pytest.raises(train.Interrupted):  # killed after step 3: the last checkpoint is step 2
        train.train(CFG, data, str(tmp_path / "b"), {}, stop_after=3, progress=False)
    assert sorted(os.listdir(tmp_path / "b")) == ["2", "run.json"]
    resumed = train.train(CFG, data, str(tmp_path / "b"), {}, progress=False)
    assert int(resumed["step"]) == 6
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_or_corrupt_checkpoints_give_clear_errors(tmp_path):
    data = _random_data()
    train.train(CFG, data, str(tmp_path), {}, stop_after=None, progress=False)
    other = train.TrainConfig(**{**CFG.__dict__, "hidden": (4, 4)})
    with pytest.raises(KvjaxError, match="other settings"):
        train.train(other, data, str(tmp_path), {}, progress=False)
    for root, _, files in os.walk(tmp_path / "6"):  # damage every file of the last checkpoint
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(KvjaxError, match="cannot be restored"):
        train.train(CFG, data, str(tmp_path), {}, progress=False)


def test_sharded_step_equals_single_device_step():
    script = textwrap.dedent("""
        import jax, numpy as np
        from kvjax import sharding
        from train_controller import train
        assert jax.device_count() == 8, jax.devices()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 6)).astype(np.float32)
        c = np.abs(rng.standard_normal((64, 4))).astype(np.float32)
        cfg = train.TrainConfig(steps=3, batch=64, hidden=(16, 16), warmup=1)
        tx = train.make_optimizer(cfg)
        out = []
        for devices in (1, 8):
            step, replicated, by_batch = train.sharded_step(cfg, tx, sharding.make_mesh(devices))
            state = jax.device_put(train.init_state(cfg, tx), replicated)
            for _ in range(3):
                state = step(state, jax.device_put(x, by_batch), jax.device_put(c, by_batch))
            out.append(jax.device_get(state))
        for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        print("ok", len(out[1]["history"]))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok 3" in result.stdout, result.stderr[-2000:]


def _tiny_controller_file(tmp_path):
    from test_policies import tiny_controller

    path = str(tmp_path / "c.npz")
    save_controller(path, tiny_controller())
    return path


def test_controller_file_roundtrip_and_errors(tmp_path):
    from test_policies import tiny_controller

    path = _tiny_controller_file(tmp_path)
    assert load_controller(path) == tiny_controller()  # equal by content digest
    bad = tmp_path / "bad.npz"
    bad.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(KvjaxError, match="damaged"):
        load_controller(str(bad))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    np.savez(tmp_path / "old.npz", **{**arrays, "meta": np.asarray(json.dumps({**meta, "format": 0}))})
    with pytest.raises(KvjaxError, match="format 0"):
        load_controller(str(tmp_path / "old.npz"))
    np.savez(tmp_path / "shape.npz", **{**arrays, "mean": np.zeros(3, np.float32)})
    with pytest.raises(KvjaxError, match="malformed"):
        load_controller(str(tmp_path / "shape.npz"))
    with pytest.raises(KvjaxError, match="trained for 3 bits"):
        get_policy("mixed-learned@2.5", controller=path)
    with pytest.raises(KvjaxError, match="not found"):
        load_controller(str(tmp_path / "missing.npz"))


def test_controller_for_another_model_is_refused(tmp_path):
    from kvjax.config import get_preset
    from kvjax.policies import make_cache

    spec = get_policy("mixed-learned@3", controller=_tiny_controller_file(tmp_path))
    with pytest.raises(KvjaxError, match="trained for a model with vocab_size=256"):
        make_cache(spec, get_preset("SmolLM2-135M"), 1, 256)


def test_cli_bad_input_is_one_error_line(capsys):
    assert main(["--budget-bits", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --budget-bits")
    assert main(["--nonsense"]) == 2


def test_eval_commands_tell_controllers_apart(tmp_path):
    """`--controller` reaches only the policies that read one, and `python -m eval` keeps the scores
    of two controllers in separate cache files."""
    import argparse

    from eval.archive import cache_suffix
    from kvjax.flags import add_policy_flags, policies_from_flags
    from test_policies import tiny_controller

    path = _tiny_controller_file(tmp_path)
    parser = argparse.ArgumentParser()
    add_policy_flags(parser)
    learned, static, kivi, fp16 = policies_from_flags(parser.parse_args(
        ["--kv", "mixed-learned@3,mixed@3,kivi2,fp16", "--controller", path]))
    assert learned.controller == load_controller(path)
    assert static.controller is None and not hasattr(kivi, "controller") and fp16.name == "fp16"
    one, two = (get_policy("mixed-learned@3", controller=tiny_controller(seed=s)) for s in (1, 2))
    assert cache_suffix(one, "-R8").startswith("-R8-c") and cache_suffix(one, "-R8") != cache_suffix(two, "-R8")
    assert cache_suffix(get_policy("kivi2"), "-R8") == "-R8" and cache_suffix(get_policy("fp16"), "-R8") == ""
