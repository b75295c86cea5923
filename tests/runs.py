"""Helpers for tests that run train.py / eval.py: tiny configs, subprocesses, Hydra compose."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A demo set and model small enough for a few seconds per epoch on 2 CPU cores.
TINY = [
    "data.train_per_class=8", "data.val_per_class=4", "data.batch_size=16", "data.num_workers=0",
    "data.image_size=40", "data.crop_size=32", "data.val_resize=32",
    "trainer.progress=false", "trainer.device=cpu", "logger=csv",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return e


def train_cmd(run_dir, *overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]


def run_train(run_dir, *overrides, timeout=600, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cmd(run_dir, *overrides), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def compose(overrides=(), config_name="train"):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
