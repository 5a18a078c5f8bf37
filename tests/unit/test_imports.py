"""Where the step-author API lives (issue 17, "Placement"): `weft.steps` is what workers import,
and neither it nor `import weft` may load the command line (Typer, Rich, weft.cli)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI_LIBRARIES = ("typer", "rich", "click")


def _loaded_after(statement: str) -> set[str]:
    """The top-level packages (and weft.* modules) a fresh interpreter holds after `statement`."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    names = proc.stdout.split()
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("weft.")}


@pytest.mark.parametrize("statement", ["import weft", "import weft.steps",
                                       "from weft import StepContext, NonRetryableError, RetryableError"])
def test_the_step_api_loads_no_cli(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert not loaded & set(CLI_LIBRARIES), f"{statement!r} loaded {sorted(loaded & set(CLI_LIBRARIES))}"
    assert not {n for n in loaded if n == "weft.cli" or n.startswith("weft.cli.")}
    assert {n for n in loaded if n.startswith("weft.")} == {"weft.steps"}


def test_the_worker_never_loads_the_cli() -> None:
    # httpx (the http step's client) imports click and rich for its own CLI when they are installed,
    # so the worker is held to what is ours to decide: no Typer, no weft.cli, no weft module but weft.steps.
    loaded = _loaded_after("import services.worker.runtime, services.worker.steps")
    assert "typer" not in loaded
    assert {n for n in loaded if n.startswith("weft.")} == {"weft.steps"}


def test_the_public_names_are_the_step_modules() -> None:
    import weft
    import weft.steps

    assert weft.StepContext is weft.steps.StepContext
    assert weft.NonRetryableError is weft.steps.NonRetryableError
    assert weft.RetryableError is weft.steps.RetryableError


def _imports(path: Path) -> set[str]:
    """Every module a file imports (at any depth, lazy imports in functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_step_module_imports_nothing_of_the_cli_or_of_weft() -> None:
    imported = _imports(ROOT / "weft" / "steps.py")
    assert not {m for m in imported if m.split(".")[0] in (*CLI_LIBRARIES, "weft", "services")}, imported


def test_workers_import_only_the_step_module_of_weft() -> None:
    for path in sorted((ROOT / "services" / "worker").rglob("*.py")):
        ours = {m for m in _imports(path) if m == "weft" or m.startswith("weft.")}
        # `from weft.steps import X` is recorded as weft.steps and weft.steps.X
        assert {m for m in ours if not m.startswith("weft.steps")} == set(), f"{path.relative_to(ROOT)}: {ours}"
