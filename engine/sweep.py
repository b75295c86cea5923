"""Multiruns (`python train.py -m ...`): every job runs, and the sweep ends with a table of them.

* :func:`run_sweep_job` runs one job. It writes ``<job dir>/job.json`` (its number, overrides and
  folder, then its wall time) and, when the job fails, ``error.json`` with the one-line reason
  (bugs also print their traceback and log it to the job's log file); the launcher goes on.
* When the sweep is over, :func:`finish_sweep` prints the failed jobs (stderr), writes
  ``summary.md`` and ``summary.csv`` into the sweep folder, prints the Markdown (stdout) and sets
  the exit code: 2 when every failure was a user error, 1 when any was a bug.

Everything is read back from files, so this works with launchers that run jobs in other processes
(``submitit_local``, ``submitit_slurm``) as well as with the basic one, and
:func:`summary_rows` builds the same table from any folder of runs (scripts/make_tables.py uses it
for runs that are not a paper table's).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dyrelu.errors import USER_ERROR_EXIT_CODE

from .errors import BUG_EXIT_CODE, _stop_requested, _to_log_files, one_line, user_error

log = logging.getLogger("dyrelu")

ERROR_FILE = "error.json"
JOB_FILE = "job.json"
RESULTS_FILE = "results.json"
SWEEP_ID_ENV = "DYRELU_SWEEP_ID"
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
#: data configs that are generated stand-ins, never comparable with the paper's ImageNet / COCO
DEMO_DATA = ("demo", "coco_demo")


# ---------------------------------------------------------------------------------------------
# one job
# ---------------------------------------------------------------------------------------------
def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def run_sweep_job(fn: Callable[[], Any], job_dir: Path, num: int, overrides: str,
                  argv: Sequence[str] = ()) -> Any:
    """Run one job of a multirun. A failure is recorded in ``<job_dir>/error.json`` and the job
    returns None, so the launcher goes on with the next job; preemption still exits 124.

    ``overrides`` is the job's folder-name form (Hydra's ``override_dirname``), ``argv`` its full
    list of command-line overrides (shown in the sweep's table)."""
    from .signals import PREEMPTED_EXIT_CODE

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    marker = job_dir / ERROR_FILE
    marker.unlink(missing_ok=True)  # from an earlier sweep into the same folder
    record = {"sweep_id": os.environ.get(SWEEP_ID_ENV), "num": num, "overrides": list(argv),
              "override_dirname": overrides, "run_dir": str(job_dir.resolve())}
    _write_json(job_dir / JOB_FILE, record)
    t0 = time.time()
    try:
        return fn()
    except _stop_requested():
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as exc:
        err = user_error(exc)
        if err is not None:
            kind, message = "user", one_line(err)
            _to_log_files(f"{type(err).__name__}: {err}")
            print(f"error: job {num} ({overrides or 'no overrides'}): {message}", file=sys.stderr)
        else:
            kind, message = "bug", f"{type(exc).__name__}: {one_line(exc)}"
            # The whole traceback, on the console (or the launcher's .err file) and in the job's log.
            traceback.print_exc()
            log_files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
            _to_log_files("".join(traceback.format_exception(exc)))
            if log_files:
                message += f" (traceback in {log_files[0]})"
        job_dir.mkdir(parents=True, exist_ok=True)  # a failed start may have removed it
        _write_json(marker, {"sweep_id": os.environ.get(SWEEP_ID_ENV), "num": num, "overrides": overrides,
                             "kind": kind, "message": message})
        return None
    finally:
        if job_dir.is_dir():
            _write_json(job_dir / JOB_FILE, {**record, "wall_time_s": round(time.time() - t0, 2)})


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/train.yaml): remembers, in the process that
    launches the sweep, where its jobs write, so that :func:`finish_sweep` can summarise them."""

    sweep_dir: Optional[Path] = None
    sweep_id: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        SweepSummary.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = SweepSummary.sweep_id  # inherited by jobs in other processes


# ---------------------------------------------------------------------------------------------
# reading a folder of runs back
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _of_this_sweep(record: Optional[dict], sweep_id: Optional[str]) -> bool:
    return record is not None and (sweep_id is None or record.get("sweep_id") in (sweep_id, None))


def sweep_failures(sweep_dir: Path, sweep_id: Optional[str]) -> list[dict]:
    failures = []
    for path in sorted(Path(sweep_dir).rglob(ERROR_FILE)):
        if ".submitit" in path.parts:
            continue
        record = _read_json(path)
        if not _of_this_sweep(record, sweep_id):
            continue
        record["job_dir"] = str(path.parent)
        failures.append(record)
    return sorted(failures, key=lambda r: r.get("num", 0))


@dataclass
class JobRow:
    """One run of a folder as the summary shows it."""
    dir: Path
    num: Optional[int]
    overrides: list            # the job's command-line overrides
    task: Optional[str]
    data: Optional[str]        # the data config's name (demo, imagenet, coco, ...)
    metric: Optional[float]    # final top-1 (cls) or AP (kpt), in %
    params: Optional[int]
    madds: Optional[int]
    wall_time_s: Optional[float]
    status: str                # completed | failed | incomplete
    reason: str = ""           # why it failed
    results: Optional[dict] = None
    config: Optional[dict] = None

    @property
    def is_demo(self) -> bool:
        return self.data in DEMO_DATA

    @property
    def chance(self) -> Optional[float]:
        """What guessing scores: 100 / num_classes top-1 for classification; None where unknown."""
        n = (self.results or {}).get("num_classes")
        return 100.0 / float(n) if self.task == "cls" and n else None

    @property
    def at_chance(self) -> bool:
        """A completed run whose final metric is within 1 point of chance: it learned nothing, which
        a table of numbers alone does not make plain (a sweep of runs all at 10.00)."""
        return (self.status == "completed" and self.metric is not None and self.chance is not None
                and abs(self.metric - self.chance) <= 1.0)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _resolved(cfg: dict) -> dict:
    """The stored config with its interpolations (``${recipe.tau}``) replaced by their values, as the run saw them."""
    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException:  # an interpolation this process cannot resolve: keep the text
        return cfg


def read_run(run_dir: Path) -> JobRow:
    """The summary row of one run folder: job.json, results.json, error.json and .hydra/ as present."""
    run_dir = Path(run_dir)
    job = _read_json(run_dir / JOB_FILE) or {}
    res = _read_json(run_dir / RESULTS_FILE)
    err = _read_json(run_dir / ERROR_FILE)
    cfg = _read_yaml(run_dir / ".hydra" / "config.yaml")
    cfg = _resolved(cfg) if isinstance(cfg, dict) else None
    overrides = job.get("overrides")
    if overrides is None:
        overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    task = (res or {}).get("task") or ((cfg or {}).get("task") or {}).get("name")
    if err is not None:
        status, reason = "failed", str(err.get("message", ""))
    elif res is not None and res.get("status", "completed") != "completed":
        status, reason = "failed", str(res.get("reason", res.get("status")))
    elif res is not None:
        status, reason = "completed", ""
    else:
        status, reason = "incomplete", "no results.json (still running, killed or preempted)"
    res_ = res or {}
    metric = res_.get("ap" if task == "kpt" else "top1")
    wall = job.get("wall_time_s", res_.get("wall_time_s"))
    return JobRow(dir=run_dir, num=job.get("num"), overrides=[str(o) for o in overrides], task=task,
                  data=((cfg or {}).get("data") or {}).get("name") or res_.get("data"),
                  metric=None if metric is None else float(metric), params=res_.get("params"), madds=res_.get("madds"),
                  wall_time_s=None if wall is None else float(wall), status=status, reason=reason, results=res, config=cfg)


def run_dirs(folder: Path, sweep_id: Optional[str] = None) -> list[Path]:
    """Every run folder under ``folder``: those holding job.json, results.json or error.json
    (of sweep ``sweep_id`` only, when given), in job order."""
    found = {}
    for name in (JOB_FILE, RESULTS_FILE, ERROR_FILE):
        for path in Path(folder).rglob(name):
            if ".submitit" in path.parts or path.parent in found:
                continue
            if sweep_id is not None and name != RESULTS_FILE:
                if not _of_this_sweep(_read_json(path), sweep_id):
                    continue
            elif sweep_id is not None:
                if not _of_this_sweep(_read_json(path.parent / JOB_FILE), sweep_id):
                    continue
            found[path.parent] = None

    def order(d: Path):
        num = (_read_json(d / JOB_FILE) or {}).get("num")
        return (num is None, num if num is not None else 0, str(d))

    return sorted(found, key=order)


def summary_rows(folder: Path, sweep_id: Optional[str] = None) -> list[JobRow]:
    return [read_run(d) for d in run_dirs(folder, sweep_id)]


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def _varying(rows: Sequence[JobRow]) -> tuple[list[str], list[list[str]]]:
    """(overrides every job shares, each job's own): the table shows what differs."""
    if len(rows) < 2:
        return [], [r.overrides for r in rows]
    common = [o for o in rows[0].overrides if all(o in r.overrides for r in rows[1:])]
    return common, [[o for o in r.overrides if o not in common] for r in rows]


def _metric_name(rows: Sequence[JobRow]) -> str:
    tasks = {r.task for r in rows if r.task}
    return "AP" if tasks == {"kpt"} else "top-1" if tasks <= {"cls"} else "top-1 / AP"


def _fmt(v: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "—" if v is None else format(float(v) / scale, spec)


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _status(r: JobRow) -> str:
    return f"failed: {r.reason}" if r.status == "failed" else r.status


def render_markdown(rows: Sequence[JobRow], title: str) -> str:
    """The table, one row per run: overrides, top-1 or AP, params, MAdds, wall time, status."""
    common, own = _varying(rows)
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "failed", "incomplete")}
    lines = [f"## {title}", "",
             f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
             f"{_metric_name(rows)} in % (final epoch); params and MAdds in millions; time as [h:]mm:ss."]
    if common:
        lines.append("Every run: `" + " ".join(common) + "`.")
    stuck = [r for r in rows if r.at_chance]
    if stuck:
        lines.append(f"**{len(stuck)} run(s) ended within 1 point of chance** (marked *at chance*; chance is "
                     f"100 / classes top-1): they learned nothing; see docs/training-health.md.")
    if any(r.is_demo for r in rows):
        lines.append("Runs on `demo` / `coco_demo` data are generated stand-ins for smoke tests: their numbers "
                     "are not comparable with ImageNet or COCO results.")
    lines += ["", f"| job | overrides | data | {_metric_name(rows)} | params | MAdds | time | status |",
              "|---:|---|---|---:|---:|---:|---:|---|"]
    for r, mine in zip(rows, own):
        cells = ["—" if r.num is None else str(r.num), " ".join(mine) or "—", r.data or "—",
                 _fmt(r.metric, ".2f") + (f" *at chance* ({r.chance:.2f})" if r.at_chance else ""),
                 _fmt(r.params, ".3f", 1e6), _fmt(r.madds, ".1f", 1e6), _fmt_time(r.wall_time_s), _status(r)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("job", "overrides", "task", "data", "top1", "ap", "params", "madds", "wall_time_s", "status", "reason", "run_dir",
              "at_chance")


def render_csv(rows: Sequence[JobRow]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        res = r.results or {}
        w.writerow({"job": r.num, "overrides": " ".join(r.overrides), "task": r.task, "data": r.data,
                    "top1": res.get("top1"), "ap": res.get("ap"), "params": r.params, "madds": r.madds,
                    "wall_time_s": r.wall_time_s, "status": r.status, "reason": r.reason, "run_dir": str(r.dir),
                    "at_chance": r.at_chance})
    return out.getvalue()


def write_summary(sweep_dir: Path, sweep_id: Optional[str] = None) -> Optional[str]:
    """summary.md and summary.csv in ``sweep_dir``; returns the Markdown (None: no runs there)."""
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir, sweep_id)
    if not rows:
        return None
    md = render_markdown(rows, f"Sweep {sweep_dir}")
    (sweep_dir / SUMMARY_MD).write_text(md)
    (sweep_dir / SUMMARY_CSV).write_text(render_csv(rows))
    return md


def finish_sweep(exit_code: int) -> int:
    """After ``hydra.main`` returned: print the sweep's table and its failed jobs (if a sweep ran)
    and return the exit code: 2 when every failure was a user error, 1 when any was a bug."""
    if SweepSummary.sweep_dir is None or exit_code not in (0, None):
        return exit_code or 0
    md = write_summary(SweepSummary.sweep_dir, SweepSummary.sweep_id)
    if md is not None:
        sys.stdout.flush()
        print("\n" + md + f"\n(written to {SweepSummary.sweep_dir / SUMMARY_MD} and {SUMMARY_CSV})", flush=True)
    failures = sweep_failures(SweepSummary.sweep_dir, SweepSummary.sweep_id)
    if not failures:
        return 0
    lines = [f"sweep {SweepSummary.sweep_dir}: {len(failures)} job(s) failed:"]
    for f in failures:
        lines.append(f"  job {f['num']} ({f['overrides'] or 'no overrides'}): {f['message']}")
    print("\n".join(lines), file=sys.stderr)
    return BUG_EXIT_CODE if any(f["kind"] == "bug" for f in failures) else USER_ERROR_EXIT_CODE
