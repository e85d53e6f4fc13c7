"""The architecture's rules, checked on the source: the card's layout, and who may import a stage module.

Stages are thin wrappers over primitives: a stage never imports another stage, and nothing outside
`stages/` imports a stage module; tools reach stages only through the registry (`pipeline.stages`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = sorted(path.stem for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__")
SOURCE_DIRS = ("pipeline", "stages", "bench", "tests")
LONGEST_MODULE = 420
"""Lines; a module longer than this is doing more than one job."""


def python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_DIRS for path in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, with `from pipeline.stages import x` counted as `pipeline.stages.x`."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            modules.add("<dynamic>")
    return modules


def stage_modules_imported(path: Path) -> set[str]:
    return {module.rsplit(".", 1)[1] for module in imported_modules(path)
            if module.startswith("pipeline.stages.") and module.rsplit(".", 1)[1] in STAGE_NAMES}


def test_the_card_layout_is_at_the_root():
    for folder in ("conf", "pipeline", "stages", "prompts", "tests"):
        assert (ROOT / folder).is_dir(), folder
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "README.md").is_file()
    assert "outputs/" in (ROOT / ".gitignore").read_text().splitlines()
    assert not (ROOT / "pipeline" / "conf").exists() and not (ROOT / "pipeline" / "stages").exists()


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_stage_imports_no_other_stage(stage):
    assert stage_modules_imported(ROOT / "stages" / f"{stage}.py") == set()


def test_only_tests_import_stage_modules_and_tools_use_the_registry():
    offenders = {
        str(path.relative_to(ROOT)): sorted(stage_modules_imported(path))
        for path in python_files()
        if stage_modules_imported(path) and path.parts[len(ROOT.parts)] != "tests"
    }
    assert offenders == {}


def test_the_registry_lists_every_stage_module():
    from pipeline.stages import STAGE_MODULES

    assert sorted(STAGE_MODULES) == STAGE_NAMES


@pytest.mark.parametrize("path", [p for p in python_files() if p.parts[len(ROOT.parts)] in ("pipeline", "stages")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_doing_several_jobs(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= LONGEST_MODULE
