"""Faults a cluster throws at runs, each injected: kill -9, SIGTERM/SIGUSR1, a kill during a
checkpoint write, a NaN loss, DDP vs one process. Nothing may be lost."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from runs import ROOT, free_port, TINY, env, results, run_train, train_cmd

# Long enough epochs to be interrupted in the middle (20 steps of 16 images).
MID = [*TINY, "data.train_per_class=32", "trainer.log_every=1"]


def _spawn(run_dir, *overrides):
    """The run in a process group of its own (as a batch job is), so a test can signal the whole group."""
    return subprocess.Popen(train_cmd(run_dir, *overrides), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc, needle, timeout=300):
    """Read the child's output until a line contains ``needle``; returns what was read."""
    seen, t0 = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        if time.time() - t0 > timeout:
            break
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)[-3000:]}")


def _weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.mark.slow
# SIGTERM to the whole process group, two DataLoader workers included (`timeout`, `kill -- -PGID`,
# SLURM signalling a job step): the workers must not die of it, and the resumed run with its workers
# must still exit when done (the workers end on their parent's SIGTERM). SIGUSR1 goes through the same
# handler (engine/signals.py), and a kill -9 at every save point is tests/test_resume_kill.py's.
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_preemption_signal_saves_mid_epoch_and_resumes(tmp_path, sig):
    args = [*MID, "trainer.max_epochs=2", "data.num_workers=2"]
    proc = _spawn(tmp_path / "run", *args)
    _wait_for(proc, "epoch 1 step 3/")
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 124, out[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and state["step_in_epoch"] >= 3

    p = run_train(tmp_path / "run", *args)
    log = p.stdout + p.stderr
    assert "Resuming from" in log and f"step {state['step_in_epoch']}" in log
    assert results(tmp_path / "run")["epochs"] == 2


def test_kill_during_checkpoint_write_leaves_previous_file_loadable(tmp_path):
    from engine.checkpoint import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    script = textwrap.dedent(f"""
        import time, torch
        from engine.checkpoint import atomic_save
        class Slow:
            def __reduce__(self):
                time.sleep(60)
                return (int, (0,))
        atomic_save({{"epoch": 2, "w": torch.zeros(1_000_000), "slow": Slow()}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env())
    t0 = time.time()
    while not list(tmp_path.glob(".last.pt.*.tmp")) and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, *TINY, "trainer.max_epochs=1")
    before = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    # Resume with an exploding learning rate: the loss leaves the finite numbers in epoch 2.
    p = run_train(run_dir, *TINY, "trainer.max_epochs=2", "optim.lr=1e38", "optim.momentum=0.0", check=False)
    assert p.returncode != 0
    assert "epoch 2 step" in p.stderr and "last.pt" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert after["epoch"] == before["epoch"] == 1
    for k in before["model"]:
        assert torch.equal(before["model"][k], after["model"][k])


def _torchrun(nproc, run_dir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    # No randomness that depends on the process count: no augmentation, no dropout.
    args = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.train_augment=false",
            "model.dropout=0.0", "act=dyrelu_b", "optim.lr=0.01"]
    run_train(tmp_path / "one", *args)
    _torchrun(2, tmp_path / "two", *args)
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Float tolerance: BN behind a freshly initialised depthwise conv divides by a tiny std, so
    # float32 gradients there are ~1e-3 (relative) away from float64 even in one process (the
    # native kernel), and these tiny 32 px nets amplify such differences within a few steps; so
    # two steps are compared. The ranks' global batch norm works in float64 and
    # tests/test_sync_bn.py checks it exactly against one process.
    one_sample = 100.0 / 40  # one of the 40 validation images
    assert abs(one["top1"] - two["top1"]) <= one_sample + 1e-9 and abs(one["top5"] - two["top5"]) <= one_sample + 1e-9

    def rows(d):
        with open(d / "metrics.csv") as f:
            return list(csv.DictReader(f))

    for r1, r2 in zip(rows(tmp_path / "one"), rows(tmp_path / "two")):
        assert abs(float(r1["train_loss"]) - float(r2["train_loss"])) < 1e-4
        assert abs(float(r1["val_loss"]) - float(r2["val_loss"])) < 1e-4
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]  # parameters
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys) ** 0.5
    assert diff / sum((a[k].double() ** 2).sum() for k in keys) ** 0.5 < 1e-4


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_submitit_usr2_saves_mid_epoch_requeues_and_resumes_to_the_same_weights(tmp_path):
    """submitit signals preemption with SIGUSR2: the run saves last.pt mid-epoch, hands the signal
    to submitit's handler (which requeues; submitit_local restarts the job), and the restarted
    job resumes mid-epoch and ends where an uninterrupted run ends."""
    args = [*MID, "trainer.max_epochs=2", "trainer.deterministic=true"]
    run_train(tmp_path / "straight", *args)

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *args, "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, task, job = time.time(), None, None
    while task is None and time.time() - t0 < 300:
        time.sleep(0.5)
        for job_dir in (sweep / ".submitit").glob("[0-9]*"):
            if any("epoch 1 step 3/" in f.read_text() for f in job_dir.glob("*_log.*")):
                tasks = _children(int(job_dir.name))  # the job id of submitit_local is its controller's pid
                task, job = (tasks[0] if tasks else None), job_dir
                break
    assert task is not None, proc.communicate(timeout=60)[0][-3000:]
    os.kill(task, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    log = "\n".join(f.read_text() for f in sorted(job.glob("*_log.*")))
    saved = re.search(r"saved \S+last\.pt at epoch 1 step (\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 3 <= step < 20
    assert "Requeued job" in log and re.search(rf"Resuming from \S+: epoch 1, step {step} ", log), log[-3000:]
    (run_dir,) = [p.parent.parent for p in sweep.rglob("checkpoints/last.pt")]
    a, b = _weights(tmp_path / "straight"), _weights(run_dir)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0), k
    assert abs(results(tmp_path / "straight")["top1"] - results(run_dir)["top1"]) < 1e-6


def test_nonfinite_validation_loss_fails_the_run_and_results_say_so(tmp_path):
    """A run whose weights blow up on its last step (the training losses it read were finite) ends
    with exit 2, one line naming the validation loss, and results.json marked failed."""
    run_dir = tmp_path / "run"
    p = run_train(run_dir, *TINY, "trainer=smoke", "optim.lr=1e12", check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert "validation loss became non-finite at epoch 1" in line, p.stderr[-2000:]
    res = results(run_dir)
    assert res["status"] == "failed" and res["reason"] == line.removeprefix("error: ")
    assert "top1" not in res and res["epochs"] == 0  # no metrics of a diverged model, no epoch completed


def test_completed_run_says_so_in_results(smoke_run):
    run_dir, _ = smoke_run  # train.py trainer=smoke on TINY (conftest)
    res = results(run_dir)
    assert res["status"] == "completed" and "reason" not in res and res["threads"] >= 1
