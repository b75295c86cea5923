"""Checkpoints that survive kills: written to a temporary file, fsynced, then renamed; and the
one reader of a checkpoint file, which turns a damaged or foreign file into one line."""
from __future__ import annotations

import os
import pickle
import random
import struct
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dyrelu.errors import CorruptDataError, MissingPathError


class DamagedCheckpointError(CorruptDataError, ValueError):
    """A checkpoint file exists but cannot be used: cut short, zero bytes, random bytes, or another
    kind of file (JSON, a bare tensor). The message names the file and what to do."""


# What torch.load raises on bytes that stop making sense, depending on where they stop: a cut zip
# archive fails in its reader (RuntimeError) or in a seek past the end (OSError), a zero-byte file
# in the unpickler (EOFError), other bytes in whatever the pickle opcodes they happen to spell run
# into. Only the torch.load call is guarded, so a bug anywhere else keeps its traceback.
_UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError,
               TypeError, AttributeError, ImportError, struct.error, OverflowError)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6


def previous(path: str | os.PathLike) -> Path:
    """Where ``atomic_save(..., keep_previous=True)`` keeps the file it replaces: last.pt -> last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """torch.save to ``path`` so that a kill at any moment leaves the old file or the new one.

    ``keep_previous``: the file replaced becomes :func:`previous` (also by a rename), so that a
    ``path`` damaged later (a bad copy, a full disk under a sync tool) costs one checkpoint, not the
    run. A kill between the two renames leaves only the previous file, which resume then reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous(path))
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_unfinished(folder: str | os.PathLike) -> None:
    """Delete the temporary files of writes that a kill cut short: nothing reads them, and each can
    be as large as a checkpoint."""
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike, need: Sequence[str] = ("model",), advice: str = "copy it again from its run") -> dict:
    """The checkpoint dict in ``path`` (on the CPU), which must have the keys ``need``: the one way
    every command reads a checkpoint. A missing file is a ``MissingPathError``; an unreadable or
    incomplete one a ``DamagedCheckpointError`` saying what is wrong, then ``advice``."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise MissingPathError(f"checkpoint {path} is a folder, not a file (expected <run>/checkpoints/best.pt or last.pt)")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"checkpoint {path} is empty (0 bytes); {advice}")
    try:
        # Our own files: they hold numpy RNG states and plain containers, not only tensors.
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except _UNREADABLE as exc:
        with open(path, "rb") as f:
            head = f.read(8)
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        if head.startswith(_ZIP_MAGIC):
            what = f"is damaged: cut short or corrupted ({reason})"
        else:
            what = f"is not a PyTorch checkpoint (it starts with {head!r}; torch.load: {reason})"
        raise DamagedCheckpointError(f"checkpoint {path} {what}; {advice}") from None
    if not isinstance(saved, dict):
        raise DamagedCheckpointError(f"checkpoint {path} holds a {type(saved).__name__}, not a training checkpoint "
                                     f"(a dict with {', '.join(need)}, ...); {advice}")
    missing = [k for k in need if k not in saved]
    if missing or not isinstance(saved.get("model", {}), dict):
        keys = ", ".join(map(str, list(saved)[:6])) or "nothing"
        raise DamagedCheckpointError(f"checkpoint {path} is not a training checkpoint: it has no {', '.join(missing or ['model weights'])} "
                                     f"(its keys: {keys}); {advice}")
    return saved


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
