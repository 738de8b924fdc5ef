"""The layers point one way: `videobert/` imports neither Ray nor `pipelines`, and no stage
module under `pipelines/` imports another stage module (only `run` and `cli` compose stages).

Every import counts, also those inside functions, read from the source with `ast` in a child
interpreter (see `tests/imports_of.py` for why).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import STAGES

REPO = Path(__file__).resolve().parent.parent
COMPOSERS = {"run", "cli"}
STAGE_MODULES = set(STAGES.values()) - COMPOSERS
LIBRARY_FILES = sorted((REPO / "videobert").glob("*.py"))
PIPELINE_FILES = sorted((REPO / "pipelines").glob("*.py"))


@functools.cache
def imports_of_all(paths: tuple[Path, ...]) -> dict[str, set[str]]:
    """The modules each file imports, parsed in one child interpreter."""
    script = REPO / "tests" / "imports_of.py"
    child = subprocess.run([sys.executable, str(script), *map(str, paths)], capture_output=True, text=True)
    # A file that does not parse must name itself, as `ast.parse` in this process did.
    assert child.returncode == 0, child.stderr[-3000:]
    return {path: set(modules) for path, modules in json.loads(child.stdout).items()}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (see `tests/imports_of.py`); the repo's own files are parsed
    together, in one child interpreter for the whole module."""
    if path in LIBRARY_FILES or path in PIPELINE_FILES:
        return imports_of_all(tuple(LIBRARY_FILES + PIPELINE_FILES))[str(path)]
    return imports_of_all((path,))[str(path)]


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("def f():\n    import ray.data\n    from pipelines import extract\n")
    assert {"ray.data", "pipelines", "pipelines.extract"} <= imported_modules(source)


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.name)
def test_library_imports_neither_ray_nor_pipelines(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("ray", "pipelines")}
    assert not bad, f"videobert/{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_only_run_and_cli_compose_stages(path: Path) -> None:
    if path.stem in COMPOSERS:
        return
    stages = {f"pipelines.{name}" for name in STAGE_MODULES}
    bad = (imported_modules(path) & stages) - {f"pipelines.{path.stem}"}
    assert not bad, f"pipelines/{path.name} imports the stage modules {sorted(bad)}"


def test_every_stage_module_exists() -> None:
    missing = [name for name in STAGES.values() if not (REPO / "pipelines" / f"{name}.py").exists()]
    assert not missing
