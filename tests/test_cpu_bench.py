"""pallas_kernels.cpu_bench: the part sets mirror the policies, and the command runs end to end."""

import json

import jax
import numpy as np
import pytest

from pallas_kernels import cpu_attention, cpu_bench

needs_kernel = pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu_attention.available(),
                                  reason=f"no CPU kernel here: {cpu_attention.unavailable_reason()}")
SMALL = cpu_bench.Shapes(layers=2, heads=4, kv_heads=2, head_dim=32, group=16, window=32, sinks=4)


@pytest.mark.parametrize("policy", cpu_bench.POLICIES)
@pytest.mark.parametrize("context", [40, 100])
def test_every_policy_holds_the_context(policy, context):
    """Each row's valid slots over all parts: the context (the token included, its cache slot masked out)."""
    parts = cpu_bench.policy_parts(policy, SMALL, 3, context)
    held = sum(np.asarray(p.valid).sum(axis=1) for p in parts)
    assert list(held) == [context] * 3
    dry = cpu_bench.policy_parts(policy, SMALL, 3, context, dry=True)
    assert [cpu_bench.part_bytes(p) for p in dry] == [cpu_bench.part_bytes(p) for p in parts]
    nbytes, macs = cpu_bench.case_stats(SMALL, 3, parts)
    assert macs == SMALL.layers * 2 * SMALL.head_dim * SMALL.heads * 3 * context and nbytes > 0


def test_bytes_of_a_kivi2_tier():
    """48 bytes per slot and kv head at h = 64, G = 32: 32 of codes, 16 of float16 scales and zeros."""
    s = cpu_bench.Shapes(layers=1)
    packed, stage = cpu_bench.Builder(s, 1, 0, dry=True).kivi(1024, 2, 2)
    assert cpu_bench.part_bytes(packed) == 1024 * 3 * 48 + 1024  # + the valid mask


@needs_kernel
def test_the_command_runs(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = cpu_bench.main(["--contexts", "200", "--batches", "1", "--rounds", "1", "--seconds", "0.001",
                         "--copy-mib", "4", "--policies", "fp16,kivi2,int8-sink", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "limits" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["fp16", "kivi2", "int8-sink"]
    assert all(r["ms"] > 0 and r["fraction"] > 0 and r["copy_GBps"] > 0 and r["fma_GFLOPs"] > 0 for r in rows)
    assert rows[0]["vs_fp16"] == 1.0


def test_unknown_policies_are_refused(capsys):
    assert cpu_bench.main(["--policies", "fp16,nope"]) == 2
    assert "unknown policies" in capsys.readouterr().err
