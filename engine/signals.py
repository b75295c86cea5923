"""SLURM preemption and time limits: SIGTERM / SIGUSR1 ask the run to save and stop.

The handler only sets a flag; the loop checks it between steps, writes last.pt and exits
with code 124 (hydra-submitit requeues jobs on time-out, and on SLURM we request the
requeue ourselves so preemption is covered too).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 124


class StopRequested(Exception):
    """Raised after the checkpoint was written, to unwind the loop."""


class PreemptionHandler:
    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


def request_requeue() -> None:
    """Put this SLURM job back in the queue; a no-op outside SLURM."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    ) or os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        log.warning("requeued SLURM job %s; it will resume from last.pt", job)
    except Exception as exc:  # the run is saved either way
        log.warning("could not requeue SLURM job %s: %s", job, exc)
