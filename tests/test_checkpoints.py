"""Checkpoint files, in process: every loader (eval.py, inspect_dynamic.py, train.py ckpt=, resume)
turns a damaged or foreign file into one line naming it (exit 2 at the command line); resume falls
back to last.prev.pt; ``ckpt=`` names the DY-ReLU constants it sets over the config's.
(The kill -9 in the middle of a checkpoint write, then resume, is tests/test_resume_kill.py's
``mid_write``.)"""
from __future__ import annotations

import importlib
import json
import logging
import os
import random

import pytest
import torch
from omegaconf import OmegaConf

import dyrelu
from dyrelu.errors import BadValueError
from engine import checkpoint as ckpt_io
from engine.state import RESUME_KEYS, Start, load_init_weights, read_start
from runs import TINY, compose, load_script


def _good(path):
    torch.save({"model": {"w": torch.randn(64, 64)}, "config": {"seed": 0}, "epoch": 1, "optimizer": {},
                "global_step": 5, "rng": None}, path)
    return path


def _damage(kind, path, tmp_path):
    """Write a damaged file of ``kind`` to ``path``."""
    if kind == "truncated":
        data = _good(tmp_path / "whole.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "json":
        path.write_text(json.dumps({"model": "mbv2_035", "epoch": 1}))
    elif kind == "bare-tensor":
        torch.save(torch.zeros(3), path)
    return path


KINDS = ["truncated", "zero-byte", "random-bytes", "json", "bare-tensor"]


def _one_error_line(capsys, path) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {path} "), err
    return err[0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_turns_a_damaged_file_into_one_line(kind, tmp_path, capsys, monkeypatch):
    bad = _damage(kind, tmp_path / "bad.pt", tmp_path)
    with pytest.raises(ckpt_io.DamagedCheckpointError, match=f"checkpoint {bad} "):
        ckpt_io.load(bad)
    # eval.py, and inspect_dynamic.py (both through engine/evaluate.py's load_run): one line, exit 2
    eval_py = importlib.import_module("eval")
    with pytest.raises(SystemExit) as e:
        eval_py.main([f"ckpt={bad}"])
    assert e.value.code == 2
    assert "use the run's other checkpoint" in _one_error_line(capsys, bad)
    with pytest.raises(SystemExit) as e:
        load_script("inspect_dynamic").main([str(bad)])
    assert e.value.code == 2
    _one_error_line(capsys, bad)
    # train.py ckpt=, as train.py runs it: found before anything is built, and the run folder Hydra
    # made (.hydra/) is removed
    from engine import loop
    from engine.errors import exit_on_user_error

    monkeypatch.setattr(loop, "build_data", lambda *a, **k: pytest.fail("built the data before reading ckpt="))
    run_dir = tmp_path / "outputs" / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e, exit_on_user_error(run_dir):
        loop.run(compose([*TINY, f"ckpt={bad}"]), run_dir)
    assert e.value.code == 2
    assert "point ckpt= at an intact checkpoint" in _one_error_line(capsys, bad)
    assert not (tmp_path / "outputs").exists()
    # resume of a run folder whose last.pt is damaged and has no previous checkpoint
    (run_dir / "checkpoints").mkdir(parents=True)
    last = _damage(kind, run_dir / "checkpoints" / "last.pt", tmp_path)
    with pytest.raises(ckpt_io.DamagedCheckpointError, match=f"checkpoint {last} .*move the run's checkpoints folder"):
        loop.run(compose(TINY), run_dir)
    assert last.exists()  # left where it is: the user decides


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    last, prev = folder / "last.pt", folder / "last.prev.pt"
    for epoch in (1, 2):  # two saves: the first becomes last.prev.pt
        ckpt_io.atomic_save({k: {} for k in RESUME_KEYS} | {"epoch": epoch, "global_step": 5 * epoch}, last,
                            keep_previous=True)
    assert ckpt_io.load(prev, RESUME_KEYS)["epoch"] == 1
    (folder / ".last.pt.abc.tmp").write_bytes(b"half a write")
    assert read_start(last, None).saved["epoch"] == 2
    assert not list(folder.glob(".*.tmp"))  # a cut write's leftover is removed
    os.truncate(last, 100)
    with caplog.at_level(logging.WARNING, logger="dyrelu.train"):
        start = read_start(last, None)
    assert (start.path, start.saved["epoch"]) == (prev, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"checkpoint {last} is damaged" in warnings[0] and "last.damaged.pt" in warnings[0]
    # the damaged file is out of the way, so the next save cannot rotate it over last.prev.pt
    assert not last.exists() and (folder / "last.damaged.pt").exists()
    assert read_start(last, None).path == prev  # a kill between the two renames of a save looks the same
    prev.write_bytes(b"")
    with pytest.raises(ckpt_io.DamagedCheckpointError, match="is empty"):
        read_start(last, None)


class _Net(torch.nn.Module):
    def __init__(self, tau=30.0, lambda_b=0.5, head_lambda_b=0.5, width=8):
        super().__init__()
        self.body = dyrelu.DyReLU(width, "C", tau=tau, lambda_b=lambda_b)
        self.head = torch.nn.Sequential(dyrelu.DyReLU(width, "B", lambda_b=head_lambda_b))


def test_ckpt_names_the_dyrelu_constants_it_sets_over_the_config(tmp_path, caplog):
    cfg = OmegaConf.create({"model": {"name": "net"}, "act": {"name": "dyrelu_c"}, "head_act": {"name": "dyrelu_b"}})
    stored = _Net(tau=10.0, lambda_b=1.0, head_lambda_b=0.25)
    start = Start("init", tmp_path / "best.pt", {"model": stored.state_dict(), "config": {}})
    model = _Net()
    with caplog.at_level(logging.INFO, logger="dyrelu.train"):
        load_init_weights(model, start, cfg)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    for part in ("act.tau=10.0 (given 30.0)", "act.lambda_b=1.0 (given 0.5)", "head_act.lambda_b=0.25 (given 0.5)"):
        assert part in lines[0], lines[0]
    assert float(model.body.tau) == 10.0  # the checkpoint's values are loaded
    caplog.clear()
    load_init_weights(_Net(tau=10.0, lambda_b=1.0, head_lambda_b=0.25), start, cfg)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # nothing overridden, nothing said
    with pytest.raises(BadValueError, match="holds another network"):
        load_init_weights(_Net(width=16), start, cfg)
