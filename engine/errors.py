"""Known failures end the process with one clear line on stderr and a non-zero exit code."""
from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger("dyrelu")


def _known() -> tuple[type, ...]:
    from .loop import NonFiniteLossError
    from .validate import ConfigError

    kinds = [ConfigError, NonFiniteLossError, FileNotFoundError]
    try:
        from data.imagenet import BadImageError, DatasetRootError

        kinds += [BadImageError, DatasetRootError]
    except ImportError:
        pass
    return tuple(kinds)


@contextlib.contextmanager
def exit_on_known_error(keep_going: bool = False):
    """ValueError and the project's own errors carry a message meant for the user: print it, exit 1
    (or, with ``keep_going``, as in a multirun, return so that the next job runs).

    Preemption exits 124 after the checkpoint is saved. Anything else is a bug: full traceback.
    """
    from .signals import PREEMPTED_EXIT_CODE, StopRequested

    try:
        yield
    except StopRequested:
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ValueError,) + _known() as exc:
        _to_log_files(f"{type(exc).__name__}: {exc}")
        print(f"error: {exc}", file=sys.stderr)
        if not keep_going:
            sys.exit(1)


def _to_log_files(message: str) -> None:
    """Record the error in the run's log file without repeating it on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
