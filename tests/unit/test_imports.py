"""Where things live (issue 17, "Placement"): `weft.steps` is what workers import, and neither it
nor `import weft` may load the command line (Typer, Rich, weft.cli); the CLI package's modules
import each other one way only, never in a loop."""

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


CLI = ROOT / "weft" / "cli"


def _cli_graph() -> dict[str, set[str]]:
    """weft.cli module -> the weft.cli modules it imports. `from weft.cli import x` names the
    submodule x when there is one, else the package itself (weft/cli/__init__.py)."""
    modules = {("weft.cli" if p.stem == "__init__" else f"weft.cli.{p.stem}"): p for p in CLI.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path.name}: relative import"
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                               for a in node.names)
        graph[name] = (targets & modules.keys()) - {name}
    return graph


def test_the_cli_package_imports_in_one_direction() -> None:
    graph = _cli_graph()
    assert {"weft.cli", "weft.cli.common", "weft.cli.output"} <= graph.keys()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            raise AssertionError(f"import cycle in weft/cli: {' -> '.join(cycle)}")
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    # Only the package's __init__ gathers the command modules; the shared ones import none of them.
    assert not any("weft.cli" in targets for targets in graph.values())
    assert graph["weft.cli.output"] == set()
    assert graph["weft.cli.common"] == {"weft.cli.output"}


def test_the_step_module_imports_no_cli_module() -> None:
    imported = _imports(ROOT / "weft" / "steps.py")
    assert not {m for m in imported if m == "weft.cli" or m.startswith("weft.cli.")}
