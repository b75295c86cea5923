"""trainer.threads (engine/threads.py): each run's share of the cores, the registry of live runs,
the oversubscription warning. Nothing here is timed: the speed under contention is measured by
scripts/bench_contention.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from engine import threads as th


@pytest.fixture
def neighbour():
    """A live process other than this one (a stand-in for another training run)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_fair_share_divides_and_never_reaches_zero():
    assert th.fair_share(8, 1) == 8
    assert th.fair_share(8, 2) == 4
    assert th.fair_share(2, 3) == 1
    assert th.fair_share(1, 0) == 1


@pytest.mark.parametrize("launcher,expected", [
    (None, 1), ({}, 1), ({"n_jobs": 3}, 3), ({"n_jobs": -1}, 8), ({"n_jobs": -2}, 7), ({"n_jobs": 0}, 1),
    ({"n_jobs": None}, 1),
])
def test_sweep_jobs_counts_like_joblib(launcher, expected):
    assert th.sweep_jobs(launcher, ncores=8) == expected


def test_registry_lists_live_runs_and_drops_dead_and_reused_pids(tmp_path, neighbour):
    reg = th.Registry(tmp_path)
    reg.register(os.getpid(), 2)
    reg.register(neighbour.pid, 1)
    dead = _dead_pid()
    reg.register(dead, 4)
    # A file whose pid is alive but belongs to a process started at another time: a reused pid.
    (tmp_path / "1.json").write_text(json.dumps({"pid": neighbour.pid, "start": "-1", "threads": 9}))
    (tmp_path / "junk.json").write_text("{not json")
    live = {(e.pid, e.threads) for e in reg.live()}
    assert live == {(os.getpid(), 2), (neighbour.pid, 1)}
    assert not (tmp_path / f"{dead}.json").exists() and not (tmp_path / "1.json").exists()
    reg.unregister(os.getpid())
    assert {e.pid for e in reg.live()} == {neighbour.pid}


def test_auto_takes_the_cores_alone_and_a_share_beside_another_run(tmp_path, neighbour, caplog):
    reg = th.Registry(tmp_path)
    before = torch.get_num_threads()
    cpu = th.CpuThreads(None, jobs=1, registry=reg, base=4, ncores=4).start()
    try:
        assert cpu.threads == torch.get_num_threads() == 4
        assert {(e.pid, e.threads, e.auto) for e in reg.live()} == {(os.getpid(), 4, True)}
        reg.register(neighbour.pid, 4, auto=True)  # another auto run starts with all 4 cores
        with caplog.at_level(logging.WARNING, logger="dyrelu.threads"):
            cpu.rebalance()  # this run yields to half (and the other will at its next check: no warning)
            assert cpu.threads == torch.get_num_threads() == 2
            assert not [r for r in caplog.records if r.levelno == logging.WARNING]
            reg.register(neighbour.pid, 4, auto=False)  # ... but one with trainer.threads=4 cannot yield
            cpu.rebalance()
            cpu.rebalance()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once while it lasts
        assert "6 threads on 4 cores" in warnings[0] and "trainer.threads" in warnings[0]
        reg.register(neighbour.pid, 2, auto=False)
        caplog.clear()
        cpu.poll()  # less than POLL_S since the last check: nothing to do
        cpu.rebalance()
        assert cpu.threads == 2 and not [r for r in caplog.records if r.levelno == logging.WARNING]
        neighbour.kill()
        neighbour.wait()
        cpu.POLL_S = 0.0
        cpu.poll()  # alone again (seen at a sync point): the cores come back
        assert cpu.threads == torch.get_num_threads() == 4
    finally:
        cpu.stop()
    assert torch.get_num_threads() == before
    assert reg.live() == []


def test_explicit_threads_are_kept_and_deterministic_runs_ignore_neighbours(tmp_path, neighbour):
    reg = th.Registry(tmp_path)
    reg.register(neighbour.pid, 1)
    explicit = th.CpuThreads(3, jobs=2, registry=reg, base=4, ncores=4).start()
    try:
        assert explicit.threads == 3
        explicit.rebalance()
        assert explicit.threads == 3
    finally:
        explicit.stop()
    fixed = th.CpuThreads(None, adaptive=False, jobs=1, registry=reg, base=4, ncores=4).start()
    try:
        assert fixed.threads == 4  # the neighbour does not change a deterministic run's count
        reg.register(neighbour.pid, 4)
        fixed.rebalance()
        assert fixed.threads == 4
    finally:
        fixed.stop()
    swept = th.CpuThreads(None, adaptive=False, jobs=2, registry=reg, base=4, ncores=4).start()
    try:
        assert swept.threads == 2  # a local sweep's parallel jobs are known in advance
    finally:
        swept.stop()


def test_base_threads_is_torch_default_capped_by_the_usable_cores():
    assert 1 <= th.base_threads() <= th.cores()
