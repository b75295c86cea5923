"""What differs between classification and keypoints sits behind one small interface (base.Task)."""
from __future__ import annotations

from dyrelu.errors import BadNameError

from .base import Task

_TASKS = {}


def register_task(name: str):
    def deco(cls):
        _TASKS[name] = cls
        return cls

    return deco


def build_task(cfg) -> Task:
    name = cfg.task.name
    if not _TASKS:
        from . import cls, kpt  # noqa: F401  (registers)
    if name not in _TASKS:
        raise BadNameError(f"task.name={name!r} is not a known task; valid: {', '.join(sorted(_TASKS))}")
    return _TASKS[name](cfg)
