"""How the command-line entry points end: user mistakes in one line, bugs with their traceback.

* A :class:`dyrelu.errors.UserError` (bad value, bad name, missing path, corrupt data, NaN loss)
  prints ``error: <message>`` on stderr and exits with code 2. Hydra wraps errors raised while it
  instantiates a config (``Error in call to target ...``); the user error inside is unwrapped.
* Preemption (``StopRequested``, raised once the checkpoint is saved) exits with code 124.
* Anything else is a bug and keeps its full traceback.

In a multirun sweep every job runs: a failing job records its one-line reason in
``<job dir>/error.json`` (bugs also print their traceback and log it to the job's log file) and
returns, and when the sweep is over :func:`finish_sweep` prints a summary naming each failed job
and sets the exit code. The markers are files, so this works with launchers that run jobs in
other processes (``submitit_local``, ``submitit_slurm``) as well as with the basic one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dyrelu.errors import USER_ERROR_EXIT_CODE, BadValueError, UserError

log = logging.getLogger("dyrelu")

BUG_EXIT_CODE = 1
ERROR_FILE = "error.json"
SWEEP_ID_ENV = "DYRELU_SWEEP_ID"
#: files Hydra itself writes into a run folder before the job starts
_HYDRA_OWN = (".hydra",)

# An example value for each mandatory (``???``) key the configs have, shown in the error.
_MISSING_EXAMPLES = {
    "data.root": "data.root=/path/to/dataset",
    "ckpt": "ckpt=<run>/checkpoints/best.pt",
}


def user_error(exc: BaseException) -> Optional[UserError]:
    """``exc`` if it is a user error, or the user error Hydra's instantiate wrapped; else None."""
    from hydra.errors import InstantiationException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return exc
        if not isinstance(exc, InstantiationException):
            return None
        exc = exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line. An error re-raised from a DataLoader worker carries the
    worker's traceback in its message; its last line holds the original message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if len(lines) > 1 and "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]


def check_mandatory(cfg: DictConfig, command: str) -> None:
    """Raise one ``BadValueError`` naming every ``???`` key left unset, before anything is built."""
    missing = [k for k in sorted(OmegaConf.missing_keys(cfg)) if not k.startswith("hydra.")]
    if missing:
        example = " ".join(_MISSING_EXAMPLES.get(k, f"{k}=<value>") for k in missing)
        raise BadValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (???): "
                            f"run {command} {example}")


def _stop_requested() -> type:
    from .signals import StopRequested

    return StopRequested


def _to_log_files(message: str) -> None:
    """Record the error in the run's log file without repeating it on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def remove_if_untouched(run_dir: Path) -> bool:
    """Delete ``run_dir`` (and its parents up to the working directory, while empty) when it holds
    only what Hydra wrote before the job started: a failed start leaves no run folder behind."""
    run_dir = Path(run_dir).resolve()
    cwd = Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir == cwd or run_dir in cwd.parents:
        return False
    for entry in run_dir.iterdir():
        if entry.name in _HYDRA_OWN or (entry.name == "train.log" and entry.is_file()):
            continue
        return False
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != cwd and cwd in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent
    return True


@contextlib.contextmanager
def exit_on_user_error(run_dir: Optional[Path] = None):
    """A user error prints one line and exits 2 (removing ``run_dir`` if nothing was written to it);
    preemption exits 124; anything else propagates with its traceback."""
    from .config import OverrideError
    from .signals import PREEMPTED_EXIT_CODE

    try:
        yield
    except _stop_requested():
        sys.exit(PREEMPTED_EXIT_CODE)
    except OverrideError as exc:
        # A bad override in a script's command line: Hydra's own message and exit code, exactly
        # what train.py prints for the same override.
        print(str(exc), file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        _to_log_files(f"{type(err).__name__}: {err}")
        if run_dir is not None:
            remove_if_untouched(run_dir)
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)



# ---------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------
def run_sweep_job(fn: Callable[[], Any], job_dir: Path, num: int, overrides: str) -> Any:
    """Run one job of a multirun. A failure is recorded in ``<job_dir>/error.json`` and the job
    returns None, so the launcher goes on with the next job; preemption still exits 124."""
    from .signals import PREEMPTED_EXIT_CODE

    job_dir = Path(job_dir)
    marker = job_dir / ERROR_FILE
    marker.unlink(missing_ok=True)  # from an earlier sweep into the same folder
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
        job_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"sweep_id": os.environ.get(SWEEP_ID_ENV), "num": num, "overrides": overrides,
                                      "kind": kind, "message": message}, indent=2))
        return None


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/train.yaml): remembers, in the process that
    launches the sweep, where its jobs write, so that :func:`finish_sweep` can summarise them."""

    sweep_dir: Optional[Path] = None
    sweep_id: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        SweepSummary.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = SweepSummary.sweep_id  # inherited by jobs in other processes


def sweep_failures(sweep_dir: Path, sweep_id: Optional[str]) -> list[dict]:
    failures = []
    for path in sorted(Path(sweep_dir).rglob(ERROR_FILE)):
        if ".submitit" in path.parts:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if sweep_id is not None and record.get("sweep_id") not in (sweep_id, None):
            continue
        record["job_dir"] = str(path.parent)
        failures.append(record)
    return sorted(failures, key=lambda r: r.get("num", 0))


def finish_sweep(exit_code: int) -> int:
    """After ``hydra.main`` returned: print the failed jobs of the sweep (if one ran) and return
    the exit code: 2 when every failure was a user error, 1 when any was a bug."""
    if SweepSummary.sweep_dir is None or exit_code not in (0, None):
        return exit_code or 0
    failures = sweep_failures(SweepSummary.sweep_dir, SweepSummary.sweep_id)
    if not failures:
        return 0
    lines = [f"sweep {SweepSummary.sweep_dir}: {len(failures)} job(s) failed:"]
    for f in failures:
        lines.append(f"  job {f['num']} ({f['overrides'] or 'no overrides'}): {f['message']}")
    print("\n".join(lines), file=sys.stderr)
    return BUG_EXIT_CODE if any(f["kind"] == "bug" for f in failures) else USER_ERROR_EXIT_CODE


def cli(main: Callable[[], Any]) -> int:
    """Run a ``hydra.main`` function from ``__main__`` and turn a finished sweep into its exit code."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return finish_sweep(code)
