"""A clean install: only the library `dyrelu` is installed; the framework runs from the checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from runs import ROOT


def _env_without_checkout() -> dict:
    """The environment of a user's shell: no PYTHONPATH pointing at the checkout."""
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    return e


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Build isolation, as `pip install -e .` does: the build backend comes from pyproject's
    # build-system (setuptools>=77), not from whatever setuptools the venv happens to hold.
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = out.glob("dyrelu-*.whl")
    return whl


def test_the_wheel_holds_only_the_library(wheel):
    with zipfile.ZipFile(wheel) as z:
        top = {n.split("/")[0] for n in z.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dyrelu"}, sorted(top)
    assert any(n.startswith("dyrelu/fused/") for n in zipfile.ZipFile(wheel).namelist())
    names = zipfile.ZipFile(wheel).namelist()
    assert {"dyrelu/fused/_cpu_kernels.c", "dyrelu/fused/_cpu_ops.cpp"} <= set(names)  # built at first use


def test_installed_library_imports_anywhere_and_generic_names_do_not(wheel, tmp_path):
    """Installed from the wheel into a folder of its own: `import dyrelu` works from another
    directory, `import data` / `models` / `engine` do not (they would shadow a user's own)."""
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in site.iterdir() if not x.name.endswith(".dist-info")) == ["dyrelu"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site-packages of this environment (an editable install of the checkout may sit
    # there); the installed folder first, then torch's own folder for the library's one dependency.
    import torch

    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    code = ("import sys; sys.path[:0] = [{!r}, {!r}]; import dyrelu; print(dyrelu.__file__); "
            "import importlib.util as u; print([m for m in ('data', 'models', 'engine') if u.find_spec(m)]); "
            "from dyrelu.fused import _native; import os; "
            "print(os.path.isfile(_native.SOURCE) and os.path.isfile(_native.OPS_SOURCE), _native.error())")
    env = dict(_env_without_checkout(), DYRELU_NATIVE_CACHE=str(tmp_path / "native"))
    p = subprocess.run([sys.executable, "-S", "-c", code.format(str(site), torch_site)], cwd=elsewhere,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    file, found, native = p.stdout.strip().splitlines()[-3:]
    assert file.startswith(str(site)) and found == "[]", p.stdout
    # the wheel carries the kernels' sources, found where the installed module looks (building them is
    # the same cpp_extension call the suite's first native test makes: not repeated here, 15 s)
    assert native == "True None", native


def test_this_environment_does_not_import_the_framework_from_elsewhere(tmp_path):
    """The environment the tests run in (CI: `pip install -e .[dev]`) exposes only `dyrelu`."""
    code = ("import importlib.util as u, dyrelu; "
            "print([m for m in ('data', 'models', 'engine') if u.find_spec(m)])")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env_without_checkout(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", "framework packages importable outside the checkout"


def test_scripts_and_train_run_from_the_checkout_by_path(tmp_path):
    """Without PYTHONPATH and from another directory, the entry points find the framework themselves."""
    e = _env_without_checkout()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "complexity.py"), "model=mbv2_035", "act=relu",
                        "--input-size", "32", "32"], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["model"] == "mbv2_035"
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "job", "model=mbv2_100"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "mbv2_100" in p.stdout, p.stderr[-3000:]
