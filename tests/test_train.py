"""The training loop end to end on the demo data: run folder, eval.py, resume, bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from runs import ROOT, TINY, env, results, run_train


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_the_run_folder_and_eval_matches(smoke_run_copy):
    run_dir, p = smoke_run_copy  # train.py trainer=smoke on TINY (conftest), copied: resumed below
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1"]
    assert {"train_loss", "top1", "top5", "lr"} <= set(rows[0])
    res = results(run_dir)
    for key in ("top1", "top5", "best_top1", "params", "madds", "epochs", "num_classes", "wall_time_s"):
        assert key in res, key
    assert isinstance(res["params"], int) and res["params"] > 100_000
    assert isinstance(res["madds"], int) and res["madds"] > 0
    assert res["num_classes"] == 10 and res["epochs"] == 1
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=False)
        assert {"model", "optimizer", "scheduler", "epoch", "rng", "config"} <= set(state)
        assert state["epoch"] == 1
    # The complexity line, with the numbers of results.json, on the console and in train.log.
    line = f"{res['params'] / 1e6:.3f} M params, {res['madds'] / 1e6:.2f} M MAdds"
    assert line in p.stdout + p.stderr, (line, (p.stdout + p.stderr)[-2000:])
    assert line in (run_dir / "train.log").read_text()

    # eval.py scores the whole validation set unless told: the smoke run validated on 2 batches.
    ev = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt={run_dir}/checkpoints/best.pt",
                         "trainer.limit_val_batches=2"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    out = json.loads((run_dir / "eval_best.json").read_text())
    assert abs(out["top1"] - res["best_top1"]) < 0.01

    # The same command again with more epochs resumes from last.pt and says so.
    p2 = run_train(run_dir, "trainer=smoke", *TINY, "trainer.max_epochs=2")
    assert "Resuming from" in p2.stdout + p2.stderr
    assert [r["epoch"] for r in _rows(run_dir)] == ["1", "2"]
    assert results(run_dir)["epochs"] == 2


@pytest.mark.parametrize(
    "override, must_name",
    [
        ("model=not_a_model", ["not_a_model", "mbv2_035", "resnet50"]),
        ("act=not_an_act", ["not_an_act", "dyrelu_b"]),
        ("task=not_a_task", ["not_a_task", "cls", "kpt"]),
        ("data=not_data", ["not_data", "imagenet", "demo"]),
        ("data.batch_size=-4", ["data.batch_size", "-4", "positive integer"]),
        ("data.batch_size=abc", ["data.batch_size", "abc", "positive integer"]),
        ("optim.lr=fast", ["optim.lr", "fast", "positive number"]),
        ("trainer.device=tpu", ["trainer.device", "tpu", "cpu"]),
        ("not_a_key=1", ["not_a_key"]),
    ],
)
def test_bad_names_and_values_fail_with_one_clear_message(tmp_path, override, must_name):
    p = run_train(tmp_path / "run", *TINY, override, check=False, timeout=120)
    assert p.returncode != 0
    err = p.stderr
    assert "Traceback" not in err, err[-2000:]
    for word in must_name:
        assert word in err, (word, err[-2000:])


def test_missing_imagenet_root_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "no_imagenet_here"
    p = run_train(tmp_path / "run", "data=imagenet", f"data.root={missing}", "trainer=smoke", check=False, timeout=120)
    assert p.returncode != 0
    assert str(missing) in p.stderr and "train/" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
