"""scripts/count_ops.py: the JSON line and the counting (a small case; the budget case is the script's)."""
from __future__ import annotations

import json
import subprocess
import sys

from runs import ROOT, env, load_script


def test_count_ops_json_line_small_case():
    proc = subprocess.run([sys.executable, "scripts/count_ops.py", "--model", "mbv2_035", "--batch", "2", "--res", "32",
                           "--per-op"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"model", "batch", "res", "ops", "ratios_to_relu", "budgets", "within_budget", "per_op"}
    assert set(out["ops"]) == {"relu", "dyrelu_b", "dyrelu_c"}
    assert out["budgets"] == {"dyrelu_b": 2.0, "dyrelu_c": 3.0}
    assert proc.returncode == (0 if out["within_budget"] else 1)
    for act, total in out["ops"].items():
        assert total == sum(out["per_op"][act].values())
    # the DY-ReLU networks run the registered ops, one call per site and direction
    sites = out["per_op"]["dyrelu_b"]["dyrelu::bn_act"]
    assert sites > 10 and out["per_op"]["dyrelu_b"]["dyrelu::bn_act_backward"] == sites
    assert out["per_op"]["dyrelu_c"]["dyrelu::bn_coefs"] == out["per_op"]["dyrelu_c"]["dyrelu::apply_backward"] == sites
    assert "dyrelu::apply" not in out["per_op"]["relu"]


def test_count_step_counts_ops_inside_a_step():
    mod = load_script("count_ops")
    ops = mod.count_step("mbv2_035", "relu", batch=2, res=32)
    assert ops["aten::convolution"] > 0 and ops["aten::convolution_backward"] == ops["aten::convolution"]
