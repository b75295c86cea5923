"""train.py and eval.py as a user meets them: every mistake documented in docs/bad-input.md gives
the documented first line of stderr and exit code; sweeps run every job and end with a summary and
a non-zero exit; a bug keeps its traceback (in sweeps too); eval.py scores the whole validation set."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from runs import ROOT, TINY, compose, env, run_train

DOC = ROOT / "docs" / "bad-input.md"


def _doc_examples() -> list[tuple[str, list[str], int]]:
    """(command, stderr lines shown, exit code) of every ```console block of the page."""
    examples = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(), re.S):
        lines = block.rstrip("\n").split("\n")
        assert re.match(r"\$ ([A-Z_]+=\S+ )*python ", lines[0]) and lines[-2] == "$ echo $?", block
        examples.append((lines[0][2:], lines[1:-2], int(lines[-1])))
    return examples


def _matches(pattern: str, line: str) -> bool:
    """``...`` in a documented line stands for any text."""
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("...")), line) is not None


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A run folder whose checkpoint holds the default config: eval.py's checks run before the weights load."""
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    cfg = OmegaConf.to_container(compose([]), resolve=True)
    torch.save({"config": cfg, "model": {}, "epoch": 1}, run / "checkpoints" / "best.pt")
    return run


def _run(argv: list[str], cwd: Path, timeout=300, extra_env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("command,shown,code", _doc_examples(),
                         ids=[e[0].split("python ", 1)[1] for e in _doc_examples()])
def test_documented_mistake(tmp_path, fake_run, command, shown, code):
    words = shlex.split(command)
    extra_env = dict(w.split("=", 1) for w in words[:words.index("python")])  # VAR=value before python
    argv = words[words.index("python") + 1:]
    argv = [str(ROOT / argv[0]), *(a.replace("<run>", str(fake_run)) for a in argv[1:])]
    # In an empty working directory: whatever the command leaves behind is visible.
    p = _run(argv, tmp_path, extra_env=extra_env)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == code, p.stderr[-3000:]
    assert err and _matches(shown[0], err[0]), (shown[0], p.stderr[-3000:])
    rest = iter(err[1:])
    for want in shown[1:]:  # the other lines shown follow, in order
        assert any(_matches(want, line) for line in rest), (want, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    if code == 2 and " -m " not in command:
        assert list(tmp_path.iterdir()) == [], "a failed start left files behind"


def test_every_mistake_of_the_page_exits_2():
    """Mistakes exit 2, Hydra's own command-line errors included; 1 is kept for bugs."""
    codes = {code for _, _, code in _doc_examples()}
    assert codes == {2}


@pytest.mark.parametrize("overrides", [["+model.dynamic_stem_last=false"], ["task=kpt", "+model.in_chans=3"], ["++act.k=3"],
                                       ["model=resnet18", "+model.zero_init_residual=true"]])
def test_added_keys_that_the_builder_takes_are_accepted(overrides):
    from engine.cli import check_added_keys

    check_added_keys(compose(overrides), overrides)


@pytest.mark.parametrize("overrides,shown", [
    (["+act.tau=100"], "+act.tau=100: act (dyrelu_b) has no key tau"),
    (["++act.tau=100"], "++act.tau=100: act (dyrelu_b) has no key tau"),
    (["+trainer.foo=1"], "+trainer.foo=1: trainer has no key foo"),
    (["model=mbv3_small", "+model.dropuot=0.1"], "(did you mean +model.dropout?)"),
])
def test_added_keys_nothing_reads_are_rejected(overrides, shown):
    from dyrelu.errors import BadNameError
    from engine.cli import check_added_keys

    with pytest.raises(BadNameError) as e:
        check_added_keys(compose(overrides), overrides)
    assert shown in str(e.value) and "\n" not in str(e.value)


def test_group_typos_in_a_sweep_are_one_line_too(tmp_path):
    p = _run([str(ROOT / "train.py"), "-m", "act=relu,dyrelu_d", f"hydra.sweep.dir={tmp_path / 'sw'}"], tmp_path)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith("error: act=dyrelu_d: no such act config (did you mean act=dyrelu_")


# ---- sweeps ----------------------------------------------------------------------------------
def _multirun(sweep_dir, *overrides, timeout=900):
    return _run([str(ROOT / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"], ROOT, timeout)


def _check_sweep(p, sweep_dir):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    jobs = sorted(d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert len(jobs) == 2
    bad, good = jobs
    record = json.loads((bad / "error.json").read_text())
    assert record["kind"] == "user" and record["message"] == "optim.lr='abc' is not valid: expected a positive number"
    assert (good / "results.json").is_file() and not (good / "error.json").exists()  # the job after the failure ran
    # The table of the sweep: printed, and written as Markdown and CSV from the job folders.
    md = (sweep_dir / "summary.md").read_text()
    assert md.strip() in p.stdout
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == 2 and "optim.lr=abc" in rows[0] and "failed: optim.lr='abc' is not valid" in rows[0]
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells[1] == "optim.lr=0.08" and cells[-1] == "completed" and float(cells[4]) > 0 and float(cells[5]) > 0
    assert (sweep_dir / "summary.csv").read_text().count("\n") == 3
    summary = p.stderr[p.stderr.index("sweep "):].splitlines()
    assert summary[0] == f"sweep {sweep_dir.resolve()}: 1 job(s) failed:"
    assert summary[1].startswith("  job 0 (") and "optim.lr=abc" in summary[1]
    assert summary[1].endswith("): optim.lr='abc' is not valid: expected a positive number")
    assert "Traceback" not in p.stderr


def test_sweep_with_a_failed_job_runs_every_job_then_exits_2(tmp_path):
    sweep = tmp_path / "sweep"
    _check_sweep(_multirun(sweep, "act=relu", "optim.lr=abc,0.08", "trainer=smoke", *TINY), sweep)


@pytest.mark.slow
def test_sweep_summary_with_jobs_in_other_processes(tmp_path):
    sweep = tmp_path / "sweep"
    _check_sweep(_multirun(sweep, "act=relu", "optim.lr=abc,0.08", "trainer=smoke", *TINY,
                           "hydra/launcher=submitit_local"), sweep)


# ---- bugs keep their traceback -----------------------------------------------------------------
# A ValueError deep inside the model: a bug, not a user mistake.
_BOOM = """
import runpy, sys
import dyrelu.core

def forward(self, x):
    raise ValueError("boom inside DyReLU.forward")

dyrelu.core.DyReLU.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _boom(tmp_path) -> str:
    path = tmp_path / "boom.py"  # a file, so that the traceback shows its source lines
    path.write_text(_BOOM)
    return str(path)


def test_a_value_error_inside_the_model_keeps_its_traceback(tmp_path):
    p = _run([_boom(tmp_path), str(ROOT / "train.py"), "act=dyrelu_b", "trainer=smoke", *TINY,
              f"hydra.run.dir={tmp_path / 'run'}"], ROOT)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" in p.stderr and 'raise ValueError("boom inside DyReLU.forward")' in p.stderr
    assert "error: " not in p.stderr


def test_a_bug_in_a_sweep_job_keeps_its_traceback_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    p = _run([_boom(tmp_path), str(ROOT / "train.py"), "-m", "act=dyrelu_b,relu", "trainer=smoke", *TINY,
              f"hydra.sweep.dir={sweep}"], ROOT)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" in p.stderr and 'raise ValueError("boom inside DyReLU.forward")' in p.stderr
    bad, good = sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    record = json.loads((bad / "error.json").read_text())
    assert record["kind"] == "bug" and record["message"].startswith("ValueError: boom inside DyReLU.forward")
    assert "Traceback" in (bad / "train.log").read_text()
    assert (good / "results.json").is_file()
    assert "sweep " in p.stderr and "ValueError: boom inside DyReLU.forward" in p.stderr[p.stderr.index("sweep "):]


# ---- eval.py -------------------------------------------------------------------------------------
def test_eval_scores_the_whole_validation_set_once_and_writes_one_file_per_checkpoint(tmp_path, smoke_run_copy):
    run_dir, _ = smoke_run_copy  # train.py trainer=smoke on TINY (conftest): validation capped at 2 batches of 16
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    ckpt = f"ckpt={run_dir}/checkpoints/best.pt"
    p = _run([str(ROOT / "eval.py"), ckpt], cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(printed) == 1  # the result, once
    out = json.loads(printed[0])
    assert out["val_images"] == out["val_samples"] == 40  # 10 classes x 4: all of them, not the smoke run's 32
    assert out == json.loads((run_dir / "eval_best.json").read_text())
    assert list(cwd.iterdir()) == []  # no outputs/eval/<time>/ folder
    assert (run_dir / "metrics.png").stat().st_size > 0  # the run drew its metrics at the end

    p = _run([str(ROOT / "eval.py"), f"ckpt={run_dir}/checkpoints/last.pt", "trainer.limit_val_batches=1",
              "data.num_workers=0"], cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["val_images"] == 16
    # Another checkpoint's result lands beside the first one, which is kept.
    assert json.loads((run_dir / "eval_last.json").read_text())["val_images"] == 16
    assert json.loads((run_dir / "eval_best.json").read_text()) == out


# ---- COCO-format data from explicit paths ---------------------------------------------------------
def test_explicit_coco_paths_train_without_a_root(tmp_path):
    """Any COCO-format keypoint set (OCHuman, CrowdPose, ...): the four paths are enough."""
    from data.coco_demo import ensure_coco_demo

    src = ensure_coco_demo(tmp_path / "elsewhere", num_train=8, num_val=4, image_size=64)
    ann = src / "annotations"
    run_dir = tmp_path / "run"
    run_train(run_dir, "task=kpt", "data=coco", f"data.train_ann={ann / 'person_keypoints_train2017.json'}",
              f"data.train_images={src / 'train2017'}", f"data.val_ann={ann / 'person_keypoints_val2017.json'}",
              f"data.val_images={src / 'val2017'}", "trainer=smoke", "data.batch_size=4", "data.input_size=[128,96]",
              "data.heatmap_size=[32,24]", "data.num_workers=0", "trainer.progress=false")
    res = json.loads((run_dir / "results.json").read_text())
    assert res["task"] == "kpt" and "ap" in res
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").data.root is None
