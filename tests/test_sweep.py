"""Multiruns end with a table of their jobs: failures recorded per job, the table built from the
sweep folder's files alone (job.json, results.json, error.json), so it also works for jobs that ran
in other processes."""
from __future__ import annotations

import csv
import io
import json

from dyrelu.errors import BadValueError
from engine import sweep


def _job(root, num, overrides, *, results=None, error=None, data="demo", wall=12.0):
    d = root / f"{num}_{'_'.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(f"data:\n  name: {data}\ntask:\n  name: cls\n")
    (d / "job.json").write_text(json.dumps({"sweep_id": "s", "num": num, "overrides": overrides, "run_dir": str(d),
                                            "wall_time_s": wall}))
    if results is not None:
        (d / "results.json").write_text(json.dumps({"task": "cls", **results}))
    if error is not None:
        (d / "error.json").write_text(json.dumps({"sweep_id": "s", "num": num, "kind": "user", "message": error}))
    return d


def test_the_summary_is_built_from_the_folder_alone(tmp_path):
    common = ["trainer=smoke", "seed=3"]
    _job(tmp_path, 0, ["act=relu", *common], results={"top1": 61.25, "params": 1_700_000, "madds": 59_200_000})
    _job(tmp_path, 1, ["act=dyrelu_b", *common], error="optim.lr='abc' is not valid: expected a positive number")
    _job(tmp_path, 2, ["act=dyrelu_c", *common], data="imagenet", wall=3725.0,
         results={"top1": float("nan"), "params": 2_000_000, "madds": 61_000_000, "status": "failed",
                  "reason": "validation loss is nan"})
    _job(tmp_path, 3, ["act=prelu", *common])  # killed before it wrote anything
    md = sweep.write_summary(tmp_path)
    assert md == (tmp_path / sweep.SUMMARY_MD).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]
    assert [c[0] for c in cells] == ["0", "1", "2", "3"]
    assert cells[0] == ["0", "act=relu", "demo", "61.25", "1.700", "59.2", "0:12", "completed"]
    assert cells[1][1] == "act=dyrelu_b" and cells[1][7] == "failed: optim.lr='abc' is not valid: expected a positive number"
    assert cells[2][6] == "1:02:05" and cells[2][7] == "failed: validation loss is nan"
    assert cells[3][3] == "—" and cells[3][7] == "incomplete"
    assert "Every run: `trainer=smoke seed=3`" in md and "not comparable" in md  # demo runs are labelled
    table = list(csv.DictReader(io.StringIO((tmp_path / sweep.SUMMARY_CSV).read_text())))
    assert [r["status"] for r in table] == ["completed", "failed", "failed", "incomplete"]
    assert table[0]["overrides"] == "act=relu trainer=smoke seed=3" and table[0]["params"] == "1700000"


def test_sweep_jobs_record_failures_and_the_summary_names_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.SweepSummary, "sweep_dir", tmp_path)
    monkeypatch.setattr(sweep.SweepSummary, "sweep_id", "this-sweep")
    monkeypatch.setenv(sweep.SWEEP_ID_ENV, "this-sweep")

    def bad():
        raise BadValueError("optim.lr='abc' is not valid: expected a positive number")

    assert sweep.run_sweep_job(bad, tmp_path / "0_optim.lr=abc", 0, "optim.lr=abc", ["optim.lr=abc"]) is None
    assert sweep.run_sweep_job(lambda: 61.5, tmp_path / "1_optim.lr=0.1", 1, "optim.lr=0.1", ["optim.lr=0.1"]) == 61.5
    job = json.loads((tmp_path / "1_optim.lr=0.1" / sweep.JOB_FILE).read_text())
    assert job["num"] == 1 and job["overrides"] == ["optim.lr=0.1"] and job["wall_time_s"] >= 0
    stale = tmp_path / "old" / sweep.ERROR_FILE  # left by an earlier sweep into the same folder
    stale.parent.mkdir()
    stale.write_text(json.dumps({"sweep_id": "earlier", "num": 5, "overrides": "", "kind": "bug", "message": "x"}))
    capsys.readouterr()
    assert sweep.finish_sweep(0) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"sweep {tmp_path}: 1 job(s) failed:",
        "  job 0 (optim.lr=abc): optim.lr='abc' is not valid: expected a positive number",
    ]
    assert "| 0 | optim.lr=abc |" in out and "| 1 | optim.lr=0.1 |" in out and "| 5 |" not in out  # this sweep's jobs

    def bug():
        raise KeyError("deep inside")

    sweep.run_sweep_job(bug, tmp_path / "2_act=x", 2, "act=x")
    assert "Traceback" in capsys.readouterr().err
    assert sweep.finish_sweep(0) == 1  # a bug outranks the user errors
    assert json.loads((tmp_path / "2_act=x" / sweep.ERROR_FILE).read_text())["kind"] == "bug"
    # A rerun of a job clears its old marker.
    sweep.run_sweep_job(lambda: 1.0, tmp_path / "2_act=x", 2, "act=x")
    assert not (tmp_path / "2_act=x" / sweep.ERROR_FILE).exists()


def test_runs_that_end_at_chance_are_marked(tmp_path):
    _job(tmp_path, 0, ["act=relu"], results={"top1": 61.25, "num_classes": 10})
    _job(tmp_path, 1, ["act=dyrelu_c"], results={"top1": 10.0, "num_classes": 10})
    _job(tmp_path, 2, ["act=dyrelu_b"], results={"top1": 10.75, "num_classes": 10})
    md = sweep.write_summary(tmp_path)
    assert "**2 run(s) ended within 1 point of chance**" in md
    assert "| 10.00 *at chance* (10.00) |" in md and "| 10.75 *at chance* (10.00) |" in md and "| 61.25 |" in md
    table = list(csv.DictReader(io.StringIO((tmp_path / sweep.SUMMARY_CSV).read_text())))
    assert [r["at_chance"] for r in table] == ["False", "True", "True"]


def test_read_run_resolves_the_stored_configs_interpolations(tmp_path):
    from engine.sweep import read_run

    (tmp_path / ".hydra").mkdir()
    stored = tmp_path / ".hydra" / "config.yaml"
    stored.write_text("recipe: {tau: 30.0}\nact: {name: dyrelu_c, tau: '${recipe.tau}'}\n")
    assert read_run(tmp_path).config["act"]["tau"] == 30.0
    stored.write_text("act: {name: dyrelu_c, tau: '${nowhere.tau}'}\n")  # unresolvable: kept as written
    assert read_run(tmp_path).config["act"]["tau"] == "${nowhere.tau}"
