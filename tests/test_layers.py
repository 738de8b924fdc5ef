"""The layers point one way: `videobert/` imports neither Ray nor `pipelines`, and no stage
module under `pipelines/` imports another stage module (only `run` and `cli` compose stages).

Every import counts, also those inside functions, read from the source with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipelines.cli import STAGES

REPO = Path(__file__).resolve().parent.parent
COMPOSERS = {"run", "cli"}
STAGE_MODULES = set(STAGES.values()) - COMPOSERS


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports: `import a.b` gives a.b, `from a import b` gives a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("def f():\n    import ray.data\n    from pipelines import extract\n")
    assert {"ray.data", "pipelines", "pipelines.extract"} <= imported_modules(source)


@pytest.mark.parametrize("path", sorted((REPO / "videobert").glob("*.py")), ids=lambda p: p.name)
def test_library_imports_neither_ray_nor_pipelines(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("ray", "pipelines")}
    assert not bad, f"videobert/{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.py")), ids=lambda p: p.name)
def test_only_run_and_cli_compose_stages(path: Path) -> None:
    if path.stem in COMPOSERS:
        return
    stages = {f"pipelines.{name}" for name in STAGE_MODULES}
    bad = (imported_modules(path) & stages) - {f"pipelines.{path.stem}"}
    assert not bad, f"pipelines/{path.name} imports the stage modules {sorted(bad)}"


def test_every_stage_module_exists() -> None:
    missing = [name for name in STAGES.values() if not (REPO / "pipelines" / f"{name}.py").exists()]
    assert not missing
