"""Errors caused by what the user asked for, as opposed to bugs in the code.

Every class here derives from :class:`UserError` and from the built-in exception that callers
already catch for that kind of mistake (a bad value is still a ``ValueError``, a missing path
still a ``FileNotFoundError``), so ``except ValueError`` keeps working.

The command-line entry points (``train.py``, ``eval.py``) print a ``UserError`` as one line and
exit with code 2; any other exception is a bug and keeps its full traceback. So raise these only
where the message tells the user what to change: the key or argument, the bad value and what is
allowed. Internal consistency checks stay plain ``ValueError`` / ``RuntimeError``.

This module is at the bottom of the package layering (torch-free, imported by ``models``,
``data`` and ``engine`` alike).
"""
from __future__ import annotations

__all__ = [
    "UserError",
    "BadValueError",
    "BadNameError",
    "MissingPathError",
    "CorruptDataError",
    "NonFiniteLossError",
    "USER_ERROR_EXIT_CODE",
]

#: exit code of a command that stopped on a UserError (2, as argparse uses for usage errors)
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the input (config, arguments, files); the message says what to change."""


class BadValueError(UserError, ValueError):
    """A value outside what is allowed (``optim.lr=abc``, ``k=0``, a missing mandatory key)."""


class BadNameError(UserError, ValueError):
    """An unknown name (model, activation, task, dataset); the message lists the valid ones."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user pointed at (or must point at) does not exist or is not laid out as expected."""


class CorruptDataError(UserError):
    """A data file exists but cannot be read: malformed annotations, an undecodable image. The
    data readers' own classes add the built-in base their callers catch (``data.coco.CocoFormatError``
    is also a ``ValueError``, ``data.imagenet.BadImageError`` a ``RuntimeError``)."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf (usually a too-high learning rate); the message names the step and
    the last good checkpoint."""
