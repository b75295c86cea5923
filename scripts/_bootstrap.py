"""Imported first by every script: puts the checkout on ``sys.path``.

The framework (engine/, models/, data/) runs from the checkout and is not installed (pyproject
installs only the library ``dyrelu``), so ``python scripts/<name>.py`` needs the repository root
on the path. One place does it; scripts write ``from _bootstrap import ROOT``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
