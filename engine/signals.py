"""Preemption and time limits: a signal asks the run to save last.pt and stop.

Signals handled: SIGTERM, SIGUSR1 and the one submitit uses for preemption and time-outs
(SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` names another; see submitit's
``core/job_environment.py``). The handler only sets a flag. The loop reads it at its sync
points (every ``trainer.log_every`` steps, and as often during validation: StoppableBatches), writes last.pt,
then either hands the signal to the handler that was installed before ours (submitit's, which
pickles the job and requeues it) or, when there is none, exits with code 124 (and, under a
plain SLURM batch job, requeues it with scontrol).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 124


class StopRequested(Exception):
    """Raised after the checkpoint was written, to unwind the loop.

    ``chain`` is the previously installed handler of the signal that stopped the run (bound
    to that signal), to be called once the run has unwound; None when there was none.
    """

    def __init__(self, chain: Optional[Callable[[], None]] = None):
        super().__init__("stopped by a preemption signal after saving last.pt")
        self.chain = chain


def submitit_signal() -> signal.Signals:
    """The signal submitit sends before preempting or timing out a job."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    return getattr(signal.Signals, name, signal.SIGUSR2)


def leave_stop_signals_to_main(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: a stop signal is the main process's to handle, also
    when it is sent to the whole process group or job step (``timeout``, ``kill -- -PGID``, SLURM
    signalling every process of a step), where it would otherwise kill the worker and make the
    loader raise before the main process saves last.pt.

    SIGUSR1 and submitit's signal need nothing: a forked worker inherits the main process's handler,
    which only sets a flag. SIGTERM is PyTorch's: its worker handler dies of a SIGTERM that the parent
    did not send. A SIGTERM from the parent (multiprocessing and the DataLoader stop workers with it)
    must still end the worker, or the run's exit would hang; a Python handler cannot see the sender,
    so SIGTERM is blocked and a thread takes it with ``sigwaitinfo``, which names the sender: the
    parent's ends the worker, anyone else's is ignored. (Where ``sigwaitinfo`` does not exist, macOS,
    workers keep PyTorch's default.)"""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait, name="dyrelu-sigterm", daemon=True).start()


class PreemptionHandler:
    """Context manager: while active, the stop signals set ``requested``; on exit the previous
    handlers come back."""

    def __init__(self):
        self.signals = tuple(dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, submitit_signal())))
        self.received: int | None = None
        self._previous: dict = {}

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
            log.warning("received %s: saving a checkpoint at the next sync point", signal.Signals(signum).name)
            self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def chained_handler(self) -> Optional[Callable[[], None]]:
        """The handler that was installed for the received signal before ours (e.g. submitit's
        checkpoint-and-requeue), bound to the signal; None for the defaults."""
        prev = self._previous.get(self.received)
        if not callable(prev) or prev in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler):
            return None
        signum = self.received
        return lambda: prev(signum, None)


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


class StoppableBatches:
    """Yields a loader's batches; every ``every`` batches, all ranks agree on the stop flag and
    ``on_stop()`` runs when it is set (validation honours preemption too). Ranks may hold
    different numbers of validation batches, so they agree only within the first ``common``
    batches, which every rank has."""

    def __init__(self, loader, preempt, every: int, on_stop, common: int, device: torch.device):
        self.loader, self.preempt, self.every, self.on_stop = loader, preempt, every, on_stop
        self.common, self.device = common, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=1):
            yield batch
            if i % self.every == 0 and i <= self.common and any_rank(self.preempt.requested, self.device):
                self.on_stop()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when any rank has ``flag`` set (no collective without DDP)."""
    import torch
    import torch.distributed as tdist

    from .distributed import all_reduce_sum

    if not (tdist.is_available() and tdist.is_initialized()):
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0
