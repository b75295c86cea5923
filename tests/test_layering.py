"""Imports run only downward: ``dyrelu`` <- ``models`` <- ``engine`` <- entry points (train.py,
eval.py, scripts/), with ``data`` beside ``models`` (it needs only ``dyrelu``'s errors). Every
import of the source is read with ``ast`` (function-level imports included), so a lazy import
cannot hide an upward arrow."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from runs import ROOT

ENTRY_POINTS = {"train", "eval", "scripts"}
# What each room may not import: the rooms above it.
FORBIDDEN = {
    "dyrelu": {"models", "data", "engine"} | ENTRY_POINTS,
    "models": {"data", "engine"} | ENTRY_POINTS,
    "data": {"models", "engine"} | ENTRY_POINTS,
    "engine": ENTRY_POINTS,
}


def _sources(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module or name ``path`` imports; ``from x import y``
    gives ``x.y`` (y may be a submodule or a name in x)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _upward(room: str) -> list[str]:
    bad = []
    for path in _sources(room):
        for line, name in imports(path):
            if name.split(".")[0] in FORBIDDEN[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_no_import_runs_upward(room):
    assert _upward(room) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walker resolves relative and function-level imports (a check that cannot fail proves nothing)."""
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text("def f():\n    from ..engine import loop\n    from . import helpers\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [n for _, n in imports(pkg / "net.py")] == ["engine.loop", "models.helpers"]
    assert _upward("models") == ["models/net.py:2 imports engine.loop"]


@pytest.mark.parametrize("package", ["models", "engine/tasks"])
def test_files_of_a_package_do_not_import_its_init(package):
    """Inside ``models`` the files import ``models._registry`` and each other, never the package
    ``__init__`` (which imports them, or names them: an arrow back up); the same in ``engine.tasks``."""
    dotted = package.replace("/", ".")
    files = {p.stem for p in (ROOT / package).glob("*.py")} - {"__init__"}
    bad = []
    for path in sorted((ROOT / package).glob("*.py")):
        if path.name == "__init__.py":
            continue
        for line, name in imports(path):
            if name.startswith(dotted + ".") or name == dotted:
                rest = name[len(dotted) + 1:].split(".")[0]
                if rest not in files:
                    bad.append(f"{path.name}:{line} imports {name}")
    assert bad == []


def test_training_and_evaluation_sit_side_by_side():
    """engine.loop and engine.evaluate share engine.runtime; neither imports the other, and
    runtime, state and loaders import neither."""
    def engine_imports(stem):
        return {name for _, name in imports(ROOT / "engine" / f"{stem}.py") if name.startswith("engine.")}

    assert not any(n.startswith("engine.evaluate") for n in engine_imports("loop"))
    assert not any(n.startswith("engine.loop") for n in engine_imports("evaluate"))
    assert any(n.startswith("engine.runtime") for n in engine_imports("loop"))
    assert any(n.startswith("engine.runtime") for n in engine_imports("evaluate"))
    for stem in ("runtime", "state", "loaders"):
        assert not any(n.startswith(("engine.loop", "engine.evaluate")) for n in engine_imports(stem)), stem


def test_the_config_is_validated_in_one_place():
    """``engine.validate.validate`` is called once per run, by ``engine.loop.run``, and nowhere else."""
    callers = []
    for path in [*ROOT.glob("*.py"), *(p for room in ("engine", "models", "data", "scripts") for p in _sources(room))]:
        tree = ast.parse(path.read_text(), str(path))
        names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and (node.module or "").endswith("validate") for a in node.names if a.name == "validate"}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
                        callers.append(f"{path.relative_to(ROOT)}:{fn.name}")
    assert callers == ["engine/loop.py:run"]
