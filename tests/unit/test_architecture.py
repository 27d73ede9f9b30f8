"""Rules of the package layout that import-linter cannot state: what other layers may take
from ``training/``, and how DAG tasks reach their stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT

CODE_DIRS = ("core", "pipelines", "feature_store", "training", "serving", "monitoring", "hyperrec", "dags", "bench")


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (PROJECT_ROOT / d).rglob("*.py"))


def imported_names(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every ``from module import name`` in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (node.lineno, node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    ]


def test_code_dirs_exist() -> None:
    missing = [d for d in CODE_DIRS if not (PROJECT_ROOT / d).is_dir()]
    assert not missing
    assert len(python_files("training")) > 10


@pytest.mark.parametrize("scope", ["code", "tests"])
def test_no_private_name_of_training_is_imported_from_outside(scope: str) -> None:
    dirs = [d for d in CODE_DIRS if d != "training"] if scope == "code" else ["tests"]
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line}: from {module} import {name}"
        for path in python_files(*dirs)
        for line, module, name in imported_names(path)
        if (module == "training" or module.startswith("training.")) and name.startswith("_")
    ]
    assert offenders == []


def test_the_checker_sees_a_private_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from training.bundle import _row\nfrom training import models\n")
    assert imported_names(sample) == [(1, "training.bundle", "_row"), (2, "training", "models")]


def test_no_stage_is_dispatched_by_name() -> None:
    """DAG tasks call their stage functions directly: no importlib lookups of "module:function"."""
    offenders = [
        str(path.relative_to(PROJECT_ROOT))
        for path in python_files("dags", "hyperrec")
        if "importlib" in path.read_text()
    ]
    assert offenders == []


def test_the_unit_tier_refuses_to_start_an_interpreter() -> None:
    import subprocess
    import sys

    with pytest.raises(AssertionError, match="tests/unit may not start python"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
