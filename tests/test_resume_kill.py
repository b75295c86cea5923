"""kill -9 at every kind of boundary, then the same command again: the rerun must end with exactly
(bit for bit) the weights and the metrics.csv numbers of a run that was never interrupted.

Each killed run is train.py started through a small wrapper that SIGKILLs its own process at a
precise point, so the kill lands where it is meant to on any machine load:

* ``epoch_end``: right after epoch 1's last.pt is renamed into place (the next epoch starts from
  a fresh process, which starts the loader's workers then; issue 20's regression);
* ``mid_epoch``: one training step after a mid-epoch last.pt (``trainer.save_every=2``) in epoch 2,
  so the rerun continues the saved random stream from step 2;
* ``validation``: after the first batch of epoch 2's validation (last.pt is still epoch 1's);
* ``mid_write``: half-way through writing epoch 1's last.pt (its temporary file holds half the
  bytes). The last.pt before it (epoch 1, step 4) must be intact; the test then cuts that file short
  too (a bad copy), so the rerun must resume from last.prev.pt (epoch 1, step 2), with one warning,
  and still end bit for bit as the uninterrupted run.

Covered (one uninterrupted reference per activation and worker count, shared by its cases):
ReLU with 0 workers at the epoch end, in validation and in the write, DY-ReLU-B with 2 workers at the epoch end
and mid-epoch. Every kill point, activation and worker count is covered; the full cross product
(12 cases, 4 references) would take about three times as long, and the suite must stay under 15
minutes on 2 cores.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import ROOT, TINY, Background, env, run_train

# 5 steps per epoch, 3 epochs, dropout and random crops on, a sync point every step.
ARGS = [*TINY, "trainer.max_epochs=3", "trainer.deterministic=true", "trainer.log_every=1", "trainer.save_every=2",
        "trainer.limit_val_batches=3"]

# train.py, with a SIGKILL of its own process planted at $KILL_AT (see the module docstring).
WRAPPER = r"""
import io, os, runpy, signal, sys

import torch

from torch.optim.optimizer import register_optimizer_step_post_hook

from engine import checkpoint, signals

where = os.environ["KILL_AT"]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
save = checkpoint.atomic_save
armed = []

cutting = []

def save_then_maybe_die(obj, path, **kwargs):
    last = os.path.basename(str(path)) == "last.pt"
    if where == "mid_write" and last and obj["epoch"] == 1 and obj["step_in_epoch"] == 0:
        cutting.append(1)  # torch.save below writes half of it, then dies
    save(obj, path, **kwargs)
    if not last:
        return
    if where == "epoch_end" and obj["epoch"] == 1 and obj["step_in_epoch"] == 0:
        die()
    if where == "mid_epoch" and obj["epoch"] == 1 and obj["step_in_epoch"] > 0:
        armed.append(obj["global_step"])

checkpoint.atomic_save = save_then_maybe_die
torch_save = torch.save

def torch_save_maybe_die(obj, f, *args, **kwargs):
    if not cutting:
        return torch_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    torch_save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    die()

torch.save = torch_save_maybe_die

def step_hook(opt, args, kwargs):
    if armed:  # one more step after the mid-epoch checkpoint, then die
        die()

register_optimizer_step_post_hook(step_hook)

validations = []
batches = signals.StoppableBatches.__iter__

def batches_then_maybe_die(self):
    validations.append(1)
    for i, batch in enumerate(batches(self)):
        if where == "validation" and len(validations) == 2 and i == 1:
            die()
        yield batch

signals.StoppableBatches.__iter__ = batches_then_maybe_die
sys.argv = [str(sys.argv[1]), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

CASES = [
    ("relu", 0, "epoch_end"),
    ("dyrelu_b", 2, "epoch_end"),
    ("dyrelu_b", 2, "mid_epoch"),
    ("relu", 0, "validation"),
    ("relu", 0, "mid_write"),
]


def _args(act, workers):
    return [*ARGS, f"act={act}", f"data.num_workers={workers}"]


def _rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        # the numbers of the run, not its speed
        return [{k: v for k, v in r.items() if k not in ("train_img_s", "epoch_time_s")} for r in csv.DictReader(f)]


def _last(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=False)


@pytest.fixture(scope="module")
def straight(request, tmp_path_factory):
    """The uninterrupted run of each (act, workers), run once. The references of every selected case
    start in the background when the first case starts (one at a time: the cases' own killed runs
    train beside them), and a case waits for its reference only once its own runs are done."""
    root = tmp_path_factory.mktemp("straight")
    refs = Background(jobs=1)

    def start(act, workers):
        refs.start((act, workers), root / f"{act}_{workers}", *_args(act, workers))

    for item in request.session.items:
        if item.module is request.module and hasattr(item, "callspec") and "act" in item.callspec.params:
            start(item.callspec.params["act"], item.callspec.params["workers"])

    def get(act, workers):
        start(act, workers)
        refs.get((act, workers))
        return root / f"{act}_{workers}"

    yield get
    refs.close()


@pytest.mark.slow
@pytest.mark.parametrize("act,workers,where", CASES, ids=[f"{a}-w{w}-{k}" for a, w, k in CASES])
def test_kill9_then_rerun_ends_exactly_as_the_uninterrupted_run(tmp_path, straight, act, workers, where):
    run_dir = tmp_path / "run"
    args = _args(act, workers)
    cmd = [sys.executable, "-c", WRAPPER, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env={**env(), "KILL_AT": where}, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-3000:]
    killed_at = _last(run_dir)
    expected = {"epoch_end": (1, 0), "mid_epoch": (1, 2), "validation": (1, 4), "mid_write": (0, 4)}[where]
    assert (killed_at["epoch"], killed_at["step_in_epoch"]) == expected
    checkpoints = run_dir / "checkpoints"
    if where == "mid_write":
        assert len(list(checkpoints.glob(".last.pt.*.tmp"))) == 1  # the write the kill cut short
        last = checkpoints / "last.pt"
        os.truncate(last, last.stat().st_size // 2)

    p = run_train(run_dir, *args)
    out = p.stdout + p.stderr
    assert "Resuming from" in out
    if where == "mid_write":
        assert out.count("is damaged") == 1 and "resuming from the previous checkpoint" in out, out[-3000:]
        assert "Resuming from " + str(checkpoints / "last.prev.pt") + ": epoch 1, step 2" in out
        assert not list(checkpoints.glob(".*.tmp")), "the cut write's temporary file was left behind"
    ref = straight(act, workers)
    a, b = _last(ref), _last(run_dir)
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]) == (3, 15)
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert _rows(run_dir) == _rows(ref)
