"""scripts/count_ops.py: CUDA launches per site and per step, counted on fake CUDA tensors (no GPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runs import ROOT, env, load_script

pytest.importorskip("triton")


def test_cuda_launch_counts_json_line_and_budgets():
    """The budget case itself (MobileNetV2 x1.0, bf16 autocast, channels_last): one run, ~20 s."""
    proc = subprocess.run([sys.executable, "scripts/count_ops.py", "--per-op"], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=600)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    sites, steps = out["cuda_launches_per_site"], out["cuda_launches_per_step"]
    assert set(sites) == {"relu", "dyrelu_b", "dyrelu_c"} and set(steps) == {"relu", "dyrelu_b"}
    assert proc.returncode == (0 if out["within_budget"] else 1)
    assert not any(out["host_syncs"].values()), out["host_syncs"]
    for key, total in list(sites.items()):
        assert total == sum(out["per_op"]["site:" + key].values())
    # a B site: statistics, _fwd1, _fwd2, apply, running update; apply backward, _bwd1, _bwd2, _dx
    site_b = out["per_op"]["site:dyrelu_b"]
    assert all(k.startswith("triton:") for k in site_b), site_b
    assert sites["dyrelu_b"] <= 12 and sites["relu"] >= 4
    assert steps["dyrelu_b"] <= 1.6 * steps["relu"], steps


def test_count_step_counts_ops_inside_a_step():
    mod = load_script("count_ops")
    ops = mod.count_step("mbv2_035", "relu", batch=2, res=32)
    assert ops["aten::convolution"] > 0 and ops["aten::convolution_backward"] == ops["aten::convolution"]
