"""The package layout of docs/architecture.md: stage libraries apart from the application,
imports only downward along the data flow."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "condnoise"
SHARED = {"errors", "io", "locks", "paths", "rng", "stats", "schema", "plotting", "provenance"}
STAGES = ("data", "conditioning", "models", "diffusion", "training", "evaluation", "theory",
          "study")  # fmt: skip
#: the allowed-imports table of docs/architecture.md (besides the shared modules)
ALLOWED: dict[str, set[str]] = {
    "data": set(),
    "conditioning": set(),
    "models": {"conditioning"},
    "diffusion": {"models"},
    "training": {"data", "conditioning", "models", "diffusion"},
    "evaluation": {"data"},
    "theory": set(),
    "study": {"data", "conditioning", "models", "diffusion", "training", "evaluation", "theory"},
    "app": set(STAGES),
    "cep": {"conditioning"},  # condnoise/cep.py: the public alias of conditioning/attach.py
}


def _part(module: str) -> str | None:
    """``condnoise.training.trainer`` -> ``training``; ``condnoise.io`` -> ``io``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "condnoise" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    """Every ``condnoise.*`` module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "condnoise":
            out |= {f"condnoise.{a.name}" for a in node.names if a.name != "__version__"}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return {m for m in out if m.startswith("condnoise.")}


def test_imports_follow_the_allowed_table():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py") if rel.parts else ""
        for module in _imports(path):
            target = _part(module)
            if target is None or target == part:
                continue
            if part in SHARED or part in ("__init__", "__main__"):
                ok = target in SHARED or (part == "__main__" and target == "app")
            else:
                ok = target in SHARED or target in ALLOWED.get(part, set())
            if not ok:
                bad.append(f"{rel} imports {module}")
    assert not bad, "\n".join(bad)


def test_argparse_only_in_the_app():
    users = [p.relative_to(REPO) for p in PACKAGE.rglob("*.py") if "argparse" in p.read_text()]
    assert users and all(p.parts[:2] == ("condnoise", "app") for p in users), users


@pytest.mark.parametrize("stage", STAGES)
def test_importing_a_stage_never_imports_the_app(stage):
    """Every module of the stage, imported in a fresh interpreter."""
    modules = sorted(f"condnoise.{stage}." + p.stem for p in (PACKAGE / stage).glob("*.py")
                     if p.stem != "__init__")  # fmt: skip
    code = (f"import sys, condnoise.{stage}\n"
            + "".join(f"import {m}\n" for m in modules)
            + "assert 'condnoise.app' not in sys.modules, 'condnoise.app'\n"
            + ("assert 'condnoise.data' not in sys.modules, 'condnoise.data'\n"
               if stage == "conditioning" else ""))  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
