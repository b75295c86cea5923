"""CPU threads shared fairly between the dyrelu runs of one machine (``trainer.threads``).

Why: each run's OpenMP threads spin while they wait for work. Two runs side by side, each with as
many threads as there are cores, measured 15x slower each on a 2-core machine (issue 20), where
one thread each kept about half the solo speed. So a run takes its share of the cores:

* ``trainer.threads=N``: N threads, whatever else runs.
* ``trainer.threads=null`` (auto): the process's cores (torch's default thread count, which
  honours ``OMP_NUM_THREADS``, capped by ``os.sched_getaffinity``) divided by the number of
  dyrelu runs live on this machine, or by a local sweep's parallel jobs (a launcher's ``n_jobs``)
  when that is larger. Re-checked at every epoch start and every 30 s at sync points, so an
  earlier run yields to a newer one and takes its cores back when the other ends; except under ``trainer.deterministic=true``,
  where the count never depends on neighbours (it can change the last bits of results).

The live runs are pid files in a per-user runtime folder (``$XDG_RUNTIME_DIR/dyrelu-runs``, else
``<tmp>/dyrelu-runs-<uid>``); files whose process is gone are ignored and removed. One warning
line when the runs need more threads than there are cores even once every auto run has yielded
to one thread.

DataLoader workers run one thread each (torch's worker loop sets that), so only the main
process needs a count.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("dyrelu.threads")

_BASE: list = []  # the process's thread count before any change, read once


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def base_threads() -> int:
    """torch's thread count as the process started (OMP_NUM_THREADS or torch's default), capped by cores()."""
    if not _BASE:
        _BASE.append(max(1, min(torch.get_num_threads(), cores())))
    return _BASE[0]


def fair_share(base: int, runs: int) -> int:
    """``base`` threads divided among ``runs`` runs, at least one each."""
    return max(1, base // max(1, runs))


def sweep_jobs(launcher, ncores: int) -> int:
    """Jobs a local sweep runs at once, from its launcher config (joblib's ``n_jobs``: -1 is every
    core, -2 all but one, as joblib counts); 1 for launchers without that key."""
    n = launcher.get("n_jobs") if launcher is not None else None
    if not isinstance(n, int) or isinstance(n, bool) or n == 0:
        return 1
    return max(1, n if n > 0 else ncores + 1 + n)


def hydra_sweep_jobs() -> int:
    """sweep_jobs() of the Hydra multirun this process is a job of; 1 outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return 1
        return sweep_jobs(HydraConfig.get().get("launcher"), cores())
    except Exception:  # no Hydra (run() called directly), or a launcher config we cannot read
        return 1


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return Path(base) / "dyrelu-runs"
    return Path(tempfile.gettempdir()) / f"dyrelu-runs-{os.getuid()}"


def _start_time(pid: int) -> Optional[str]:
    """When ``pid`` started (clock ticks since boot, /proc), so a reused pid is not taken for a run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid
        return False
    return start is None or _start_time(pid) in (None, start)


@dataclass
class Entry:
    pid: int
    threads: int
    auto: bool = False  # its count follows the others (it can yield down to one thread)


class Registry:
    """The live dyrelu runs of this user on this machine: one ``<pid>.json`` file each."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = Path(folder) if folder is not None else runtime_dir()

    def _path(self, pid: int) -> Path:
        return self.folder / f"{pid}.json"

    def register(self, pid: int, threads: int, auto: bool = False) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.folder / f".{pid}.tmp"
            tmp.write_text(json.dumps({"pid": pid, "start": _start_time(pid), "threads": threads, "auto": auto}))
            tmp.replace(self._path(pid))
        except OSError as exc:  # a read-only /tmp: run without neighbours' knowledge
            log.debug("cannot register run %s in %s: %s", pid, self.folder, exc)

    def unregister(self, pid: int) -> None:
        try:
            self._path(pid).unlink()
        except OSError:
            pass

    def live(self) -> list[Entry]:
        """The registered runs whose process still runs; the files of the others are removed."""
        out = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                rec = json.loads(path.read_text())
                pid, threads, start, auto = int(rec["pid"]), int(rec["threads"]), rec.get("start"), bool(rec.get("auto"))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or not ours
            if _alive(pid, start):
                out.append(Entry(pid, threads, auto))
            else:
                try:
                    path.unlink()
                except OSError:
                    pass
        return out


class CpuThreads:
    """This run's thread count, registered for the others to see. ``start()`` before any work,
    ``rebalance()`` at each epoch start, ``poll()`` at sync points (a rebalance every
    ``POLL_S`` seconds, for long epochs), ``stop()`` at the end (restores the previous count)."""

    POLL_S = 30.0

    def __init__(self, requested: Optional[int], *, adaptive: bool = True, jobs: Optional[int] = None,
                 registry: Optional[Registry] = None, base: Optional[int] = None, ncores: Optional[int] = None,
                 pid: Optional[int] = None):
        self.requested = requested
        self.adaptive = adaptive and requested is None
        self.jobs = hydra_sweep_jobs() if jobs is None else jobs
        self.registry = registry if registry is not None else Registry()
        self.base = base_threads() if base is None else base
        self.ncores = cores() if ncores is None else ncores
        self.pid = os.getpid() if pid is None else pid
        self.threads = 0
        self._previous = torch.get_num_threads()
        self._warned = False
        self._checked = 0.0

    def _choose(self, others: list[Entry]) -> int:
        if self.requested is not None:
            return int(self.requested)
        runs = self.jobs if not self.adaptive else max(self.jobs, len(others) + 1)
        return fair_share(self.base, runs)

    def _apply(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.threads = n

    def _others(self) -> list[Entry]:
        return [e for e in self.registry.live() if e.pid != self.pid]

    def _check_oversubscribed(self, others: list[Entry]) -> None:
        """Warn (once while it lasts) when the runs need more threads than there are cores even
        after every auto run has yielded down to one thread."""
        runs = [Entry(self.pid, self.threads, self.adaptive), *others]
        least = sum(1 if e.auto else e.threads for e in runs)
        if least > self.ncores and not self._warned:
            self._warned = True
            log.warning("%d dyrelu runs on this machine use %d threads on %d cores, so each runs far below its share: "
                        "run fewer at once, or set trainer.threads (this run: %d) so that they add up to at most %d",
                        len(runs), sum(e.threads for e in runs), self.ncores, self.threads, self.ncores)
        elif least <= self.ncores:
            self._warned = False

    def start(self) -> "CpuThreads":
        others = self._others()
        self._apply(self._choose(others))
        try:
            # Inter-op threads (torch.jit.fork, some backends) can be set once, before any use.
            torch.set_num_interop_threads(self.threads)
        except RuntimeError:
            pass
        self.registry.register(self.pid, self.threads, self.adaptive)
        self._checked = time.monotonic()
        log.info("CPU threads: %d (%s)", self.threads, "trainer.threads" if self.requested is not None else
                 f"auto: {self.base} shared by {max(self.jobs, len(others) + 1) if self.adaptive else self.jobs} run(s)")
        self._check_oversubscribed(others)
        return self

    def rebalance(self) -> None:
        """Take this run's share again (other runs may have started or ended)."""
        others = self._others()
        if self.adaptive:
            n = self._choose(others)
            if n != self.threads:
                log.info("CPU threads: %d -> %d (%d dyrelu runs on this machine)", self.threads, n, len(others) + 1)
                self._apply(n)
                self.registry.register(self.pid, self.threads, self.adaptive)
        self._check_oversubscribed(others)
        self._checked = time.monotonic()

    def poll(self) -> None:
        """rebalance(), at most every POLL_S seconds (cheap enough for every sync point)."""
        if time.monotonic() - self._checked >= self.POLL_S:
            self.rebalance()

    def stop(self) -> None:
        self.registry.unregister(self.pid)
        if torch.get_num_threads() != self._previous:
            torch.set_num_threads(self._previous)

    def __enter__(self) -> "CpuThreads":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
