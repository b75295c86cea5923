"""Helpers for tests that run train.py / eval.py: tiny configs, subprocesses, Hydra compose."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A demo set and model small enough for a few seconds per epoch on 2 CPU cores.
TINY = [
    "data.train_per_class=8", "data.val_per_class=4", "data.batch_size=16", "data.num_workers=0",
    "data.image_size=40", "data.crop_size=32", "data.val_resize=32",
    "trainer.progress=false", "trainer.device=cpu", "logger=csv",
]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    """The config ``train.py <overrides>`` runs with: the scripts' helper, so tests compose as they do."""
    from engine.config import compose as compose_config

    return compose_config(overrides, config_name)


def train_in_process(monkeypatch, run_dir, overrides=()):
    """``engine.loop.run`` on ``train.py <overrides>`` in this process; returns (results, the model
    it built), the model caught by a spy on the loop's model builder."""
    from engine import loop

    built = []
    build = loop.build_model

    def spy(*args, **kwargs):
        model, complexity = build(*args, **kwargs)
        built.append(model)
        return model, complexity

    monkeypatch.setattr(loop, "build_model", spy)
    return loop.run(compose(overrides), run_dir), built[0]


def wandb_offline_runs(folder) -> list[dict]:
    """What the offline W&B runs under ``folder`` recorded: group, job_type and the history keys.

    Reads ``run-*.wandb`` (W&B's record log: 32 KiB blocks of length-prefixed protobuf chunks),
    so a test can check what a dashboard would show without a server."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(Path(folder).rglob("offline-run-*/run-*.wandb")):
        run = _read_wandb_log(path, pb, struct)
        deadline = time.time() + 15
        while run["group"] is None and run["job_type"] is None and time.time() < deadline:
            # W&B's service process writes the log behind the run: on a loaded machine finish() has
            # returned before the run record was on disk (seen once in a full test run)
            time.sleep(0.5)
            run = _read_wandb_log(path, pb, struct)
        out.append(run)
    return out


def _read_wandb_log(path, pb, struct) -> dict:
    """One offline run's record log: group, job_type and the history keys."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    run = {"dir": path.parent, "group": None, "job_type": None, "history": {}}
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "run":
                run["group"], run["job_type"] = rec.run.run_group, rec.run.job_type
            elif rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    run["history"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run


class Background:
    """train.py runs started ahead of the tests that read them, at most ``jobs`` at once (each run is
    one thread: a 2-core machine trains two side by side at about the speed of one alone).

    ``start(key, run_dir, *overrides)`` queues a run (once per key); ``get(key)`` waits for it and
    returns ``run_train``'s CompletedProcess (re-raising its failure). ``close()`` waits for the rest."""

    def __init__(self, jobs: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=jobs)
        self._futures: dict = {}

    def start(self, key, run_dir, *overrides, timeout=900):
        if key not in self._futures:
            self._futures[key] = self._pool.submit(run_train, run_dir, *overrides, timeout=timeout)
        return self._futures[key]

    def get(self, key) -> subprocess.CompletedProcess:
        return self._futures[key].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
