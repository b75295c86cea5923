"""How the command-line entry points end: user mistakes in one line, bugs with their traceback.

* A :class:`dyrelu.errors.UserError` (bad value, bad name, missing path, corrupt data, NaN loss)
  prints ``error: <message>`` on stderr and exits with code 2. Hydra wraps errors raised while it
  instantiates a config (``Error in call to target ...``); the user error inside is unwrapped.
* Preemption (``StopRequested``, raised once the checkpoint is saved) exits with code 124.
* Anything else is a bug and keeps its full traceback.

How a multirun goes on past a failed job and what it prints at the end is engine/sweep.py; how
Hydra's own command-line errors become one line is engine/cli.py.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from dyrelu.errors import USER_ERROR_EXIT_CODE, BadValueError, UserError

log = logging.getLogger("dyrelu")

BUG_EXIT_CODE = 1
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
        # A bad override in a script's command line: the line train.py prints for it (Hydra's
        # exception is the context engine/config.py raised OverrideError in).
        from .cli import hydra_error_line

        line = hydra_error_line(exc.__context__, (), list_keys=False) if exc.__context__ is not None else None
        print(f"error: {line or ' '.join(p.strip() for p in str(exc).splitlines() if p.strip())}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        _to_log_files(f"{type(err).__name__}: {err}")
        if run_dir is not None:
            remove_if_untouched(run_dir)
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
