"""No benchmark script or test helper is named like an installed module: the tests put
``benchmarks/`` and ``tests/`` on ``sys.path``, and a ``benchmarks/kernels.py`` once shadowed the
``kernels`` package that transformers 5 imports (every transformers-backed slow test then failed)."""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = {REPO / "benchmarks", REPO / "tests"}


def test_no_script_shadows_an_installed_module():
    others = [p for p in sys.path if p and Path(p).resolve() not in OURS and Path(p).resolve() != REPO]
    installed = {m.name for m in pkgutil.iter_modules(others)} | set(sys.builtin_module_names)
    scripts = {p.stem for folder in OURS for p in folder.glob("*.py")} - {"conftest"}
    assert not scripts & installed, f"rename these scripts: {sorted(scripts & installed)}"
