"""The cache of generated datasets: one folder per parameter set, generated once, safely.

Several processes (DDP ranks, multirun jobs, test workers) may ask for the same dataset at
once: generation happens in a temporary folder under a file lock and is renamed into place,
so a reader never sees half a dataset.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """``$DYRELU_CACHE`` or ``~/.cache/dyrelu``."""
    env = os.environ.get("DYRELU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dyrelu"


def read_manifest(root) -> Optional[dict]:
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 600.0) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for lock {path}")
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_generated(root: Path, is_complete: Callable[[Path], bool], generate: Callable[[Path], None], what: str) -> Path:
    """Return ``root`` once ``is_complete(root)``, calling ``generate(tmp_folder)`` first if needed.

    A folder that is complete is reused; an incomplete one or one with other parameters is
    replaced; a non-empty folder without a manifest is never touched (FileExistsError).
    """
    if is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        if is_complete(root):  # somebody else finished while we waited
            return root
        if root.exists() and (not root.is_dir() or (any(root.iterdir()) and read_manifest(root) is None)):
            raise FileExistsError(f"{root} exists and is not a {what} (no {MANIFEST}); refusing to overwrite it. "
                                  f"Pick another data.root or delete the folder.")
        t0 = time.perf_counter()
        log.info("generating %s into %s", what, root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a cache may be shared
            generate(tmp)
            old = None
            if root.exists():  # stale (other parameters or incomplete): move aside, then replace
                old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
                os.rename(root, old)
            try:
                os.rename(tmp, root)
            except OSError:
                # lost a rename race against a process that does not share our lock (no fcntl,
                # or a filesystem without flock): use the winner's folder if it is complete
                if not is_complete(root):
                    raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s ready in %.1fs: %s", what, time.perf_counter() - t0, root)
    return root
