"""What differs between classification and keypoints sits behind one small interface (base.Task)."""
from __future__ import annotations

import importlib

from dyrelu.errors import BadNameError

from .base import Task

#: task.name -> (module of this package, its Task class). Imported on first use: a task pulls in
#: its data code (torchvision, pycocotools), which a failing command should not wait for.
TASKS = {"cls": ("cls", "ClassificationTask"), "kpt": ("kpt", "KeypointTask")}


def build_task(cfg) -> Task:
    name = cfg.task.name
    if name not in TASKS:
        raise BadNameError(f"task.name={name!r} is not a known task; valid: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)(cfg)
