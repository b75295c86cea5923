"""Multirun sweeps (basic and submitit_local launchers), torchrun DDP and W&B offline logging."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runs import ROOT, free_port, TINY, env


def _multirun(sweep_dir, *overrides, timeout=900):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return sorted(json.loads(f.read_text())["act"] for f in sweep_dir.rglob("results.json"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_sweeps_activations(tmp_path, launcher):
    acts = _multirun(tmp_path / "sweep", "act=relu,dyrelu_b", "trainer=smoke", *TINY, f"hydra/launcher={launcher}")
    assert acts == ["dyrelu_b", "relu"]


@pytest.mark.slow
def test_torchrun_two_process_cpu_ddp_completes(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(ROOT / "train.py"),
           "trainer=smoke", *TINY, f"hydra.run.dir={run_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["world_size"] == 2 and (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_wandb_without_api_key_runs_offline(tmp_path):
    e = env()
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        e.pop(key, None)
    e["WANDB_DIR"] = str(tmp_path)
    e["HOME"] = str(tmp_path)  # no ~/.netrc with a key
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=smoke", *TINY, "logger=wandb", f"hydra.run.dir={run_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, list((run_dir).rglob("*"))[:20]
