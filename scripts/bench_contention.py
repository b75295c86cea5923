#!/usr/bin/env python
"""Training speed of one demo run alone, then of two started side by side (issue 20: two runs each
spinning as many OpenMP threads as there are cores collapsed to 0.06x of a solo run).

    python scripts/bench_contention.py                          # DY-ReLU-B demo, 3 epochs
    python scripts/bench_contention.py --act relu --epochs 2
    python scripts/bench_contention.py --epochs 1 -- data.train_per_class=16 data.num_workers=0  # tiny

Every run is ``train.py`` in a subprocess with the environment as given, minus ``OMP_NUM_THREADS``
(unless --keep-omp-env), so the runs pick their threads as a user's would (trainer.threads=auto:
their share of the cores, through engine/threads.py's registry of live runs). Overrides after
``--`` go to every run (e.g. ``trainer.threads=2`` to measure a fixed count).

A run's img/s is the median over its epochs of metrics.csv's ``train_img_s``, leaving out the first
epoch when there are more (start-up: worker processes, kernel build, first allocations).
Prints one JSON line: each run's img/s, each side-by-side run's ratio to the solo run, and
``ok`` (issue 20's acceptance: both side-by-side runs keep >= 0.35x of solo). Time it on an
otherwise idle machine; ``settings.loadavg_*`` records how idle it was.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCEPT = 0.35


def _env(keep_omp: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if not keep_omp:
        env.pop("OMP_NUM_THREADS", None)
    return env


def _start(run_dir: Path, args: argparse.Namespace, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), f"act={args.act}", f"model={args.model}", f"sched.epochs={args.epochs}",
           "trainer.progress=false", "logger=csv", *extra, f"hydra.run.dir={run_dir}"]
    log = open(run_dir.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(args.keep_omp_env), stdout=log, stderr=subprocess.STDOUT)


def _finish(procs: dict) -> dict:
    """Waits for the runs; returns each one's img/s (or raises naming the failed run's log)."""
    out = {}
    for name, (proc, run_dir) in procs.items():
        if proc.wait() != 0:
            tail = run_dir.with_suffix(".log").read_text()[-2000:]
            raise SystemExit(f"error: the {name} run failed (exit {proc.returncode}):\n{tail}")
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        speeds = [float(r["train_img_s"]) for r in rows]
        threads = json.loads((run_dir / "results.json").read_text()).get("threads")
        out[name] = {"img_s": round(statistics.median(speeds[1:] or speeds), 2), "epochs": len(rows), "threads": threads}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--act", default="dyrelu_b")
    ap.add_argument("--model", default="mbv2_035")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--keep-omp-env", action="store_true", help="pass OMP_NUM_THREADS on to the runs")
    ap.add_argument("overrides", nargs="*", help="train.py overrides for every run (after --)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_contention_") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        solo = _finish({"solo": (_start(tmp / "solo", args, args.overrides), tmp / "solo")})["solo"]
        t_solo = time.time() - t0
        procs = {name: (_start(tmp / name, args, args.overrides), tmp / name) for name in ("pair_a", "pair_b")}
        pair = _finish(procs)
    ratios = {name: round(r["img_s"] / solo["img_s"], 3) for name, r in pair.items()}
    result = {
        "solo_img_s": solo["img_s"], "solo_threads": solo["threads"],
        "pair_img_s": {k: v["img_s"] for k, v in pair.items()}, "pair_threads": {k: v["threads"] for k, v in pair.items()},
        "ratio_to_solo": ratios, "min_ratio": min(ratios.values()), "ok": min(ratios.values()) >= ACCEPT,
        "settings": {"act": args.act, "model": args.model, "epochs": args.epochs, "overrides": args.overrides,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS") if args.keep_omp_env else None,
                     "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                     "solo_wall_s": round(t_solo, 1), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
