"""Shared test setup: generated data goes to one cache per test session unless DYRELU_CACHE is set."""
from __future__ import annotations

import os

import pytest

# The repository root is on sys.path through pyproject's `pythonpath = ["."]`: the framework
# (models, data, engine) runs from the checkout and is not installed.
#
# The suite runs on two pytest-xdist workers (pyproject: `-n 2 --dist loadscope`; `-n 0` runs it in one
# process). loadscope gives each worker whole modules, so a module-scoped run (test_train_health's
# trainings, test_resume_kill's references, test_gpu_check's quick run) is made once and read by all its
# tests; a session-scoped one (smoke_run) at most once per worker. Every worker has its own data cache;
# the native C kernels are built once for both (_dyrelu_cache).


def pytest_collection_modifyitems(config, items):
    """On an xdist worker: the modules with slow tests first (longest work first, so that the two
    workers finish together instead of one waiting out a long module at the end); the order inside
    a module and among the other modules is kept. Every worker sorts its collection the same way."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") and getattr(item, "module", None)}
    items.sort(key=lambda item: getattr(item, "module", None) is None or item.module.__name__ not in slow)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process tests run on one intra-op thread: 2-core CI machines thrash with two per test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _dyrelu_cache(tmp_path_factory):
    if not os.environ.get("DYRELU_CACHE"):
        os.environ["DYRELU_CACHE"] = str(tmp_path_factory.mktemp("dyrelu_cache"))
        if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("DYRELU_NATIVE_CACHE"):
            # the C kernels are built once for both workers, beside their own folders (the session's
            # base temp): cpp_extension locks the build folder, as for concurrent DDP ranks
            os.environ["DYRELU_NATIVE_CACHE"] = str(tmp_path_factory.getbasetemp().parent / "dyrelu_native")
    os.environ.setdefault("WANDB_MODE", "disabled")
    yield


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``train.py trainer=smoke`` on the tiny demo (runs.TINY), run once per session: (its run folder,
    its CompletedProcess). Several tests check different things of this same run; one that changes
    the folder (evaluates into it, resumes it) works on a copy (``smoke_run_copy``)."""
    from runs import TINY, run_train

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    return run_dir, run_train(run_dir, "trainer=smoke", *TINY)


@pytest.fixture
def smoke_run_copy(smoke_run, tmp_path):
    """A copy of the session's smoke run at ``tmp_path / "run"``, and the run's CompletedProcess."""
    import shutil

    src, proc = smoke_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, proc
