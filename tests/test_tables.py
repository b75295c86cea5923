"""Every paper table is one command: experiment entries, sweep scripts, make_tables.py.

The slow test runs scripts/table2.sh with data=demo trainer=smoke and the tiny demo overrides
through the submitit_local launcher (4 rows, one seed), then fills Table 2 with make_tables.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runs import ROOT, TINY, env, wandb_offline_runs

sys.path.insert(0, str(ROOT / "scripts"))
import make_tables as mt  # noqa: E402

SPECS = mt.load_specs()
PAPER = yaml.safe_load((ROOT / "configs" / "paper" / "tables.yaml").read_text())
ALL_ENTRIES = [(t.id, run) for t in SPECS.values() for run in t.runs()]


def _script(table_id: str) -> Path:
    return ROOT / "scripts" / f"{table_id}.sh"


def _dry_run(table_id, *args, **extra_env) -> str:
    e = env()
    e.update(DRY_RUN="1", **extra_env)
    p = subprocess.run(["bash", str(_script(table_id)), *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stderr


# ---------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------
def test_every_paper_row_has_an_entry_and_the_generated_files_are_current():
    counts = {t.id: len(t.rows) for t in SPECS.values()}
    assert counts == {"table2": 4, "table3": 8, "table4": 20, "table5": 18, "table6": 7, "table7": 8, "table8": 6,
                      "table9": 16, "table10": 8, "supp_table1": 10, "supp_table2": 16}
    on_disk = {(p.parent.name, p.stem) for p in (ROOT / "configs" / "experiment").rglob("*.yaml")}
    assert on_disk == set(ALL_ENTRIES)
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_experiments.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    # The paper's numbers are taken from configs/paper/tables.yaml, not copied.
    t2 = {r.id: r.paper["top1"] for r in SPECS["table2"].rows}
    assert t2 == {"relu": 60.32, "dyrelu_a": 63.28, "dyrelu_b": 66.36, "dyrelu_c": 66.31}
    assert SPECS["supp_table2"].rows[0].paper["ap"] == PAPER["supplementary_table2"]["rows"]["relu"][0]


def test_every_entry_composes_with_the_papers_data_and_with_the_demo():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    failures = []
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for table_id, run in ALL_ENTRIES:
            row = SPECS[table_id].row_for_run(run)
            demo = "coco_demo" if row.task == "kpt" else "demo"
            try:
                cfg = compose("train", [f"experiment={table_id}/{run}", f"data={demo}"])
                assert cfg.data.name == demo, "data= on the command line must beat the experiment's data"
                both = [cfg]
                if run == SPECS[table_id].runs()[0]:  # the paper's data and recipe (one entry per table: time)
                    real = compose("train", [f"experiment={table_id}/{run}"])
                    assert real.data.name == ("coco" if row.task == "kpt" else "imagenet")
                    assert real.trainer.max_epochs == (210 if row.task == "kpt" else 90 if "resnet" in row.model else 300)
                    assert cfg.trainer.max_epochs < real.trainer.max_epochs
                    both.append(real)
                for c in both:
                    assert (c.table, c.row, c.task.name, c.model.name, c.act.name) == (table_id, run, row.task, row.model, row.act)
                    assert c.logger.wandb.group == table_id and table_id in c.logger.wandb.tags
                    for k, v in row.act_overrides.items():
                        assert c.act[k] == v, (k, c.act[k], v)
                    if row.head_act is not None:
                        assert c.head_act.name == row.head_act
                    if row.positions is not None:
                        assert list(c.model.positions) == row.positions
            except Exception as exc:  # collect them all: one report
                failures.append(f"{table_id}/{run}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


def test_entries_set_what_the_paper_varies():
    e = lambda t, r: SPECS[t].row_for_run(r)  # noqa: E731
    assert (e("table5", "x035-maxout_k3").act, e("table5", "x035-maxout_k3").act_overrides) == ("maxout", {"k": 3})
    assert e("table5", "x100-dyrelu_b_k3").act_overrides == {"k": 3, "init_a": [1.0, 0.0, 0.0], "init_b": [0.0, 0.0, 0.0]}
    assert e("table5", "x100-dyrelu_b_k3").model == "mbv2_100"
    assert e("table6", "k2_seg1_noint").act_overrides == {"use_bias": False, "dynamic_segments": 1}
    assert e("table6", "k2").act_overrides == {"use_bias": True}
    assert e("table7", "a2").positions == ["a2"] and e("table7", "none").act == "relu"
    assert e("table8", "r64").act_overrides == {"reduction": 64}
    assert e("table9", "init_a_1_m0p5").act_overrides == {"init_a": [1.0, -0.5]}
    assert e("table9", "lambda_a_3").act_overrides == {"lambda_a": 3.0}
    assert {r.id for r in SPECS["table9"].rows if r.run == "default"} == {"init_a_1_0", "init_b_0_0", "lambda_a_1"}
    assert (e("table10", "mbv3_large-relu").act, e("table10", "mbv3_large-relu").head_act) == ("relu", "relu")
    assert (e("table10", "mbv2_050-dyrelu_c").act, e("table10", "mbv2_050-dyrelu_c").head_act) == ("dyrelu_c", "dyrelu_c")
    assert (e("table3", "relu-dyrelu_c").act, e("table3", "relu-dyrelu_c").head_act) == ("relu", "dyrelu_c")
    assert e("table4", "mbv3_small-relu").act == "relu"  # the standard ReLU/SE/h-swish MobileNetV3
    assert SPECS["table2"].seeds == SPECS["table3"].seeds == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# sweep scripts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table_id", list(SPECS))
def test_sweep_script_runs_every_entry_of_its_table(table_id):
    out = _dry_run(table_id, "data=demo", "hydra.sweep.dir=/tmp/x")
    cmd = next(line for line in out.splitlines() if " -m " in line)
    exps = re.search(r"experiment=(\S+)", cmd).group(1).split(",")
    assert sorted(exps) == sorted(f"{table_id}/{r}" for r in SPECS[table_id].runs())
    seeds = ",".join(map(str, SPECS[table_id].seeds))
    assert f"seed={seeds} " in cmd and "hydra.sweep.dir=/tmp/x" in cmd and cmd.endswith("data=demo")
    assert "hydra.sweep.subdir=${row}.seed${seed}" in cmd


def test_sweep_script_options():
    # torchrun: one launch per row and seed, each with its own run dir; seed= and ROWS select.
    out = _dry_run("table2", "data.root=/x", "hydra.sweep.dir=/tmp/sw", "seed=0,1",
                   TORCHRUN="torchrun --nproc_per_node=8", ROWS="relu dyrelu_c")
    cmds = [line for line in out.splitlines() if "torchrun" in line]
    assert len(cmds) == 4
    assert all(c.split("] ", 1)[1].startswith("torchrun --nproc_per_node=8 ") for c in cmds)
    assert "experiment=table2/dyrelu_c seed=1 data.root=/x hydra.run.dir=/tmp/sw/dyrelu_c.seed1" in cmds[-1]
    # Table 9's diverging row runs last.
    out = _dry_run("table9")
    assert re.search(r"experiment=\S+,table9/init_a_0_0 ", out)
    e = env()
    e.update(DRY_RUN="1", ROWS="nope")
    p = subprocess.run(["bash", str(_script("table2"))], cwd=ROOT, env=e, capture_output=True, text=True)
    assert p.returncode != 0 and "nope" in p.stderr and "dyrelu_b" in p.stderr


# ---------------------------------------------------------------------------------------------
# make_tables
# ---------------------------------------------------------------------------------------------
def _fake_run(root: Path, table, row, seed, **res):
    d = root / f"{row}.seed{seed}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"table": table, "row": row, "seed": seed,
                                                              "logger": {"wandb": {"group": table, "project": "dyrelu"}}}))
    (d / "results.json").write_text(json.dumps({"table": table, "row": row, "seed": seed, **res}))
    return d


def _make_tables(*args):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), *map(str, args)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    return p


def test_make_tables_mean_std_missing_incomplete_and_shared_rows(tmp_path):
    sw = tmp_path / "sweep"
    for seed, top1 in enumerate([60.0, 61.0, 62.0]):
        _fake_run(sw, "table2", "relu", seed, top1=top1, top5=80.0, best_top1=top1 + 1, params=1_700_000, madds=59_200_000)
    _fake_run(sw, "table2", "dyrelu_b", 0, top1=66.0, top5=86.0, best_top1=66.5, params=2_700_000, madds=65_000_000)
    inc = sw / "dyrelu_c.seed0" / ".hydra"
    inc.mkdir(parents=True)
    (inc / "config.yaml").write_text(yaml.safe_dump({"table": "table2", "row": "dyrelu_c", "seed": 0}))
    _fake_run(sw, "table9", "default", 0, top1=66.1, top5=86.4, params=1, madds=1)
    p = _make_tables(sw, "--out", tmp_path / "t.md", "--json", tmp_path / "t.json")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "t.md").read_text()
    assert md.strip() == p.stdout.strip()
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "61.00 ± 1.00" in lines["ReLU"] and "60.32 ± 0.13" in lines["ReLU"] and "+0.68" in lines["ReLU"]
    assert "| 1.70 |" in lines["ReLU"] and "| 59.2 |" in lines["ReLU"] and "0,1,2" in lines["ReLU"]
    assert "66.00" in lines["DY-ReLU-B"] and "66.36 ± 0.12" in lines["DY-ReLU-B"] and "-0.36" in lines["DY-ReLU-B"]
    assert "not run" in lines["DY-ReLU-A"] and "63.28 ± 0.12" in lines["DY-ReLU-A"]
    assert "incomplete" in lines["DY-ReLU-C"]
    for name in ("DY-ReLU-A", "DY-ReLU-C"):  # no number of ours anywhere in a missing row
        cells = [c.strip() for c in lines[name].split("|")[1:-1]]
        assert cells[1] in ("not run", "incomplete") and cells[3] == "—" and set(cells[4:]) == {"—"}, cells
    # Table 9: the one default run fills the three sub-tables' default rows; the diverging row says so.
    t9 = md.split("## Table 9")[1]
    assert t9.count("66.10") == 3 and "not converge" in t9
    cells = {t["table"]: t for t in json.loads((tmp_path / "t.json").read_text())}
    st = {r["row"]: r["status"] for r in cells["table2"]["rows"]}
    assert st == {"relu": "done", "dyrelu_a": "not run", "dyrelu_b": "done", "dyrelu_c": "incomplete"}
    # --best reads best_top1; --tables/--all choose tables; W&B path runs (disabled in tests).
    p = _make_tables(sw, "--best", "--tables", "table2", "--out", tmp_path / "b.md", "--wandb")
    assert p.returncode == 0, p.stderr
    assert "62.00 ± 1.00" in p.stdout and "Table 9" not in p.stdout
    p = _make_tables(sw, "--all", "--out", tmp_path / "a.md")
    assert all(f"## {t.title}" in p.stdout for t in SPECS.values())
    p = _make_tables(tmp_path / "empty_or_missing", "--out", tmp_path / "e.md")
    assert p.returncode == 1 and "no runs" in p.stderr


def test_make_tables_on_runs_of_no_paper_table_and_on_demo_runs(tmp_path):
    """A plain sweep gets our columns alone and a hint; demo runs are labelled and never beside the paper."""
    plain = tmp_path / "plain" / "0_act=relu"
    (plain / ".hydra").mkdir(parents=True)
    (plain / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"name": "imagenet"}, "task": {"name": "cls"}}))
    (plain / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["act=relu"]))
    (plain / "results.json").write_text(json.dumps({"task": "cls", "top1": 55.5, "params": 1_000_000, "madds": 2_000_000}))
    p = _make_tables(tmp_path / "plain", "--out", tmp_path / "p.md")
    assert p.returncode == 0, p.stderr
    assert "## Runs of no paper table" in p.stdout and "bash scripts/table2.sh" in p.stdout
    assert re.search(r"\| — \| act=relu \| imagenet \| 55\.50 \| 1\.000 \| 2\.0 \|", p.stdout), p.stdout
    assert "| job | overrides | data | top-1 | params | MAdds | time | status |" in p.stdout  # no paper column

    demo = tmp_path / "demo"
    d = _fake_run(demo, "table2", "relu", 0, top1=12.0, top5=50.0, params=1_700_000, madds=59_200_000)
    cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {"name": "demo"}}))
    failed = _fake_run(demo, "table2", "dyrelu_b", 0, top1=float("nan"), top5=0.0, status="failed", reason="val loss nan")
    (failed / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**cfg, "row": "dyrelu_b", "data": {"name": "demo"}}))
    p = _make_tables(demo, "--out", tmp_path / "d.md")
    assert p.returncode == 0, p.stderr
    assert "— demo data" in p.stdout and "not comparable" in p.stdout
    relu = next(line for line in p.stdout.splitlines() if line.startswith("| ReLU |"))
    header = p.stdout.split("| ReLU |")[0].splitlines()[-2]
    assert "12.00" in relu and "60.32" not in relu and "paper" not in header and "Δ" not in header
    assert p.stdout.count("## Table 2.") == 1  # the demo table only
    assert f"{failed.resolve()} failed (val loss nan); skipped" in p.stderr


@pytest.mark.slow
def test_table2_sweep_on_the_demo_through_submitit_fills_the_table(tmp_path):
    sweep = tmp_path / "table2"
    e = env()
    e["SEEDS"] = "0"
    args = ["data=demo", "trainer=smoke", "trainer.max_epochs=1", *TINY, "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(["bash", str(_script("table2")), *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    for row in ("relu", "dyrelu_a", "dyrelu_b", "dyrelu_c"):
        res = json.loads((sweep / f"{row}.seed0" / "results.json").read_text())
        assert (res["table"], res["row"], res["seed"], res["epochs"]) == ("table2", row, 0, 1)
        cfg = yaml.safe_load((sweep / f"{row}.seed0" / ".hydra" / "config.yaml").read_text())
        assert cfg["data"]["name"] == "demo" and cfg["act"]["name"] == row and cfg["model"]["name"] == "mbv2_035"

    p = _make_tables(sweep, "--out", tmp_path / "tables.md", "--json", tmp_path / "cells.json")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "tables.md").read_text()
    for label, paper in (("ReLU", "60.32"), ("DY-ReLU-A", "63.28"), ("DY-ReLU-B", "66.36"), ("DY-ReLU-C", "66.31")):
        line = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert re.fullmatch(r"\d+\.\d\d", cells[1]), line  # our top-1
        assert paper not in line, line  # demo data: never beside the paper's ImageNet number
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # params, MAdds (M)
    js = json.loads((tmp_path / "cells.json").read_text())[0]
    assert [r["status"] for r in js["rows"]] == ["done"] * 4

    # A row whose run is gone shows as missing, never as a number.
    shutil.rmtree(sweep / "dyrelu_a.seed0")
    os.remove(sweep / "dyrelu_c.seed0" / "results.json")
    md = _make_tables(sweep, "--out", tmp_path / "t2.md").stdout
    a = next(line for line in md.splitlines() if line.startswith("| DY-ReLU-A |"))
    c = next(line for line in md.splitlines() if line.startswith("| DY-ReLU-C |"))
    assert "not run" in a and "incomplete" in c
    assert re.search(r"\| DY-ReLU-A \| not run \| — \|", a)


def test_make_tables_reuse_borrows_identical_experiments_only(tmp_path):
    from omegaconf import OmegaConf

    from runs import compose

    def cfg(entry):
        c = OmegaConf.to_container(compose([f"experiment={entry}", "data=demo"]), resolve=True)
        c["data"]["name"] = "imagenet"  # as if on the paper's data: demo runs get a table of their own
        return c

    sw = tmp_path / "sw"
    for entry, seeds, top1 in (("table2/dyrelu_b", (0, 1, 2), 66.0), ("table2/relu", (0,), 60.0), ("table7/a1", (0,), 64.0)):
        c = cfg(entry)
        for seed in seeds:
            d = _fake_run(sw / c["table"], c["table"], c["row"], seed, top1=top1 + seed, top5=1.0, params=1, madds=1)
            c["seed"] = seed
            (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(c))
    plain = _make_tables(sw, "--tables", "table7", "--out", tmp_path / "a.md").stdout
    reused = _make_tables(sw, "--tables", "table7", "--reuse", "--out", tmp_path / "b.md").stdout
    row = lambda md, start: next(line for line in md.splitlines() if line.startswith(start))  # noqa: E731
    assert "not run" in row(plain, "| ✓ | ✓ | ✓ |") and "not run" in row(plain, "| – | – | – |")
    all3, none = row(reused, "| ✓ | ✓ | ✓ |"), row(reused, "| – | – | – |")
    assert "| 66.00 |" in all3 and "from table2/dyrelu_b" in all3  # only table 7's seed 0
    assert "| 60.00 |" in none and "from table2/relu" in none
    assert "not run" in row(reused, "| – | ✓ | – |")  # a2 alone exists nowhere


# ---------------------------------------------------------------------------------------------
# W&B dashboards (offline runs, read back from their folders)
# ---------------------------------------------------------------------------------------------
def test_training_runs_of_a_table_share_a_group_and_their_job_type_is_the_row(tmp_path, monkeypatch):
    from engine.config import compose
    from engine.loggers import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(["experiment=table2/dyrelu_b", "data=demo", "logger=wandb"])
    lg = RunLogger(cfg, tmp_path, 0, True, {"seed": 0})
    lg.log_epoch({"epoch": 1, "top1": 12.5}, step=1)
    lg.finish()
    (run,) = wandb_offline_runs(tmp_path)
    assert run["group"] == "table2" and run["job_type"] == "dyrelu_b"
    assert run["history"]["epoch/top1"] == 12.5


def test_make_tables_logs_ours_beside_the_papers_as_a_wandb_table(tmp_path):
    sw = tmp_path / "sweep"
    for seed, top1 in enumerate([60.0, 61.0]):
        _fake_run(sw, "table2", "relu", seed, top1=top1, top5=80.0, params=1_700_000, madds=59_200_000)
    p = _make_tables(sw, "--tables", "table2", "--out", tmp_path / "out" / "t.md", "--wandb", "--wandb-mode", "offline")
    assert p.returncode == 0, p.stderr
    (run,) = wandb_offline_runs(tmp_path / "out")
    assert run["group"] == "table2" and run["job_type"] == "make_tables"
    assert run["history"]["table2/table/_type"] == "table-file"
    table = json.loads((run["dir"] / "files" / run["history"]["table2/table/path"]).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    relu = next(r for r in rows if r["row"] == "relu" and r["metric"] == "top1")
    assert relu["ours"] == pytest.approx(60.5) and relu["paper"] == pytest.approx(60.32)
    assert relu["delta"] == pytest.approx(60.5 - 60.32) and relu["status"] == "done" and relu["seeds"] == "0,1"
    assert {r["row"] for r in rows} >= {"relu", "dyrelu_a", "dyrelu_b", "dyrelu_c"}  # every row, run or not


def test_make_tables_notes_every_departure_under_the_table(tmp_path, capsys):
    """Runs beside the paper's numbers get a note of every setting of ours they used (tau, the
    spatial lr, FC2's start ...); a run of recipe=paper and a ReLU run have none."""
    from omegaconf import OmegaConf

    from runs import compose

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tables as mt

    def cfg(entry, *over):
        c = OmegaConf.to_container(compose([f"experiment={entry}", "data=demo", *over]), resolve=True)
        c["data"]["name"] = "imagenet"  # as if on the paper's data
        return c

    ours, paper = cfg("table2/dyrelu_c"), cfg("table2/dyrelu_c", "recipe=paper")
    assert mt.departures(paper) == [] and mt.departures(cfg("table2/relu")) == []
    found = mt.departures(ours)
    assert "act.tau=30 (the paper: 10)" in found and "optim.spatial_lr_scale=0.1 (the paper: one lr for all)" in found
    assert any(d.startswith("act.hyper_init=zero") for d in found)
    assert mt.departures({**ours, "trainer": {**ours["trainer"], "dyrelu_warmup_epochs": 2}})[-1].startswith(
        "trainer.dyrelu_warmup_epochs=2")
    sw = tmp_path / "sw"
    for c, top1 in ((ours, 66.0), (cfg("table2/relu"), 60.0)):
        d = _fake_run(sw, "table2", c["row"], 0, top1=top1, top5=1.0, params=1, madds=1)
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(c))
    assert mt.main([str(sw), "--tables", "table2", "--out", str(tmp_path / "t.md"), "--no-wandb"]) == 0
    block = (tmp_path / "t.md").read_text().split("Departures from the paper in these runs")[1]
    assert "- `act.tau=30 (the paper: 10)`: dyrelu_c" in block and "relu," not in block
    # the paper's recipe: nothing to note
    (sw / "dyrelu_c.seed0" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(paper))
    assert mt.main([str(sw), "--tables", "table2", "--out", str(tmp_path / "p.md"), "--no-wandb"]) == 0
    assert "Departures from the paper" not in (tmp_path / "p.md").read_text()
    capsys.readouterr()  # the tables main printed
