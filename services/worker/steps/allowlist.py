"""Which modules `python` steps may call into: the operator's allowlist.

A definition names code; it never brings it, and it must not choose any code
the worker can import either: `os:system`, `cProfile:run` or `shutil:rmtree`
would run with the worker's rights. So a worker calls only into modules its
operator named:

* `WEFT_STEP_MODULES` / `weft worker --steps shop.steps,billing` /
  `weft up --steps ...`: module names, comma-separated; a name allows its
  submodules too (`shop` allows `shop.steps`);
* installed packages that declare `[project.entry-points."weft.steps"]`
  (`shop = "shop.steps"`): the module of each entry point is allowed;
* `weft up` with no `--steps` allows the modules it finds in its working
  directory (`discover`), so a project's own code runs with no flag. Names of
  the standard library and of installed distributions are never discovered:
  a stray `subprocess.py` in the folder must not open `subprocess:run`.

The check happens before anything is imported (importing a module runs it),
and again on what the attribute path reaches: the callable must be defined in
an allowed module, so an allowed module that did `from os import system`
does not open `os.system`, and no path may walk through a module object or a
dunder attribute.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weft.steps import NonRetryableError

__all__ = ["StepModules", "CallableNotAllowed", "discover", "entry_point_modules", "parse_modules", "SETTING",
           "refused_callables"]

SETTING = "WEFT_STEP_MODULES"
GROUP = "weft.steps"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SKIP_DIRS = frozenset({"venv", "env", "node_modules", "site-packages", "build", "dist", "__pycache__"})
MAX_DISCOVERED = 200


class CallableNotAllowed(NonRetryableError):
    """A `python` step names code outside the worker's allowlist; nothing was imported."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"python step: callable {path!r} is not allowed: {reason}. A worker runs step code only from the "
            f"modules its operator allows: add the module to {SETTING} (or `weft worker --steps`, "
            f"`weft up --steps`), or declare it as a [project.entry-points.\"{GROUP}\"] entry point"
        )
        self.path = path
        self.reason = reason


def parse_modules(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """'a.b, c' -> ('a.b', 'c'); raises ValueError naming a bad module name."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for part in parts:
        name = str(part).strip()
        if not name:
            continue
        if not _MODULE.match(name) or len(name) > 200:
            raise ValueError(f"{name[:80]!r} is not a module name (like shop.steps)")
        if name not in out:
            out.append(name)
    return tuple(out)


def entry_point_modules() -> tuple[str, ...]:
    """Modules named by installed `weft.steps` entry points (read from metadata, not imported)."""
    names = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        module = ep.module
        if module and _MODULE.match(module) and module not in names:
            names.append(module)
    return tuple(names)


def _installed_top_levels() -> dict[str, list[str]]:
    try:
        return dict(importlib.metadata.packages_distributions())
    except Exception:  # broken metadata of one distribution must not stop a worker
        return {}


def _resolves_inside(name: str, folder: Path) -> bool:
    """Whether `import name` would load code from `folder` (an editable install of the project itself)."""
    module = sys.modules.get(name)
    if module is not None:
        places = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
    else:
        try:
            spec = importlib.util.find_spec(name)  # a top-level name: finds, does not import
        except (ImportError, ValueError):
            return False
        if spec is None:
            return False
        places = [spec.origin, *list(spec.submodule_search_locations or [])]
    root = folder.resolve()
    return any(p and Path(p).resolve().is_relative_to(root) for p in places if isinstance(p, str))


def discover(folder: Path) -> tuple[str, ...]:
    """Top-level modules and packages in `folder`: `*.py` files and folders with Python in them.

    Hidden folders, virtual environments and build output are skipped, and so
    are names that the standard library owns, and names that an installed
    distribution (or an already loaded module) owns unless that code lives in
    `folder` itself (the project installed in editable mode). Weft's own packages
    are never discovered.
    """
    installed = _installed_top_levels()
    reserved = frozenset(sys.stdlib_module_names) | {"conftest", "setup"} | {
        name for name, dists in installed.items() if "weft" in dists}
    found: list[str] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return ()
    for entry in entries:
        name = entry.stem if entry.suffix == ".py" else entry.name
        if name.startswith((".", "_")) or name in reserved or name in _SKIP_DIRS or not _MODULE.match(name):
            continue
        if (name in installed or name in sys.modules) and not _resolves_inside(name, folder):
            continue
        try:
            if entry.is_file() and entry.suffix == ".py":
                found.append(name)
            elif entry.is_dir() and not (entry / "pyvenv.cfg").exists():
                if (entry / "__init__.py").is_file() or any(entry.glob("*.py")):
                    found.append(name)
        except OSError:
            continue
        if len(found) >= MAX_DISCOVERED:
            break
    return tuple(found)


@dataclass(frozen=True)
class StepModules:
    """The allowlist: module names whose code (and their submodules') `python` steps may call."""

    names: tuple[str, ...] = ()
    origin: str = ""  # how the list came about, for a startup line: "--steps", "discovered in /srv/app"
    _set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", parse_modules(self.names))
        object.__setattr__(self, "_set", frozenset(self.names))

    @classmethod
    def build(cls, names: Iterable[str] = (), *, entry_points: bool = True, origin: str = "") -> StepModules:
        listed = parse_modules(names)
        extra = tuple(m for m in entry_point_modules() if m not in listed) if entry_points else ()
        return cls(listed + extra, origin=origin)

    def allows(self, module: str) -> bool:
        # 'shop' allows 'shop.steps'; 'shop.steps' does not allow 'shop' or 'shopping'.
        parts = module.split(".")
        return any(".".join(parts[:i]) in self._set for i in range(1, len(parts) + 1))

    def describe(self) -> str:
        return ", ".join(self.names) if self.names else "none"

    def check_path(self, path: str) -> None:
        """Refuse `module:attr` before import: the module must be allowed, the attribute plain."""
        module, _, attrs = path.partition(":")
        if any(part.startswith("__") for part in attrs.split(".")):
            raise CallableNotAllowed(path, "dunder attributes cannot be called")
        if not self.allows(module):
            raise CallableNotAllowed(path, f"module {module!r} is not in the allowed step modules "
                                           f"({self.describe()})")

    def check_target(self, path: str, obj: Any, via: Iterable[Any]) -> None:
        """After import: the path walked through no module, and reaches code defined in an allowed module."""
        for step in via:
            if isinstance(step, type(sys)):
                raise CallableNotAllowed(path, f"the attribute path goes through module {step.__name__!r}")
        defined_in = getattr(obj, "__module__", None)
        if not isinstance(defined_in, str) or not self.allows(defined_in):
            raise CallableNotAllowed(path, f"it is defined in module {defined_in!r}, which is not allowed "
                                           f"({self.describe()})")


def refused_callables(wf: Any, modules: StepModules) -> list[str]:
    """Warnings for the `python` steps of a definition that a worker with `modules` would refuse.

    For publishers that know the allowlist (the gateway of `weft up`, the CLI beside it):
    the definition is still valid, another worker may allow more, so this warns, never refuses.
    """
    out = []
    for i, step in enumerate(wf.steps):
        path = step.with_.get("callable") if step.type == "python" else None
        if not isinstance(path, str) or "${{" in path or ":" not in path:
            continue
        module = path.partition(":")[0]
        if not modules.allows(module):
            out.append(f"steps[{i}] ({step.id}): callable {path!r} is outside this stack's step modules "
                       f"({modules.describe()}), so its worker will refuse it; if it is your step code, "
                       f"add its module to {SETTING} or `--steps`")
    return out
