"""JSON Schemas of the contract, generated from the pydantic models.

`contracts/schemas/<Name>.json` holds one schema per model: the workflow
definition, every execution event (one per member of the `Event` union, and
`Event.json` for the union itself) and the broker messages. They are checked
in, so other languages and tools can read the contract without Python;
`tests/unit/test_schemas.py` fails when they are stale.

    python -m contracts.schemas           # regenerate
    python -m contracts.schemas --check   # exit 1 when a file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, TypeAdapter

from contracts.definitions import WorkflowDef
from contracts.events import Event
from contracts.messages import StepReady, StepResult

SCHEMA_DIR = Path(__file__).parent / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
REGENERATE = "python -m contracts.schemas"


def _event_models() -> list[type[BaseModel]]:
    union, *_ = get_args(Event)  # Annotated[A | B | ..., Field(discriminator=...)]
    return list(get_args(union))


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for every model of the contract."""
    out: dict[str, dict[str, Any]] = {}
    models: list[type[BaseModel]] = [WorkflowDef, *_event_models(), StepReady, StepResult]
    for model in models:
        out[f"{model.__name__}.json"] = model.model_json_schema(by_alias=True, mode="validation")
    out["Event.json"] = {"title": "Event", **TypeAdapter(Event).json_schema(by_alias=True, mode="validation")}
    for schema in out.values():
        schema["$schema"] = DIALECT
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    return {name: render(schema) for name, schema in sorted(schemas().items())}


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of files that are missing, different, or no longer generated."""
    wanted = rendered()
    problems = []
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} (missing)")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name} (out of date)")
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            if path.name not in wanted:
                problems.append(f"{path.name} (no longer generated)")
    return problems


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write every schema; remove the ones no model produces any more. Returns what changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = stale(directory)
    wanted = rendered()
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for path in directory.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Generate the JSON Schemas of the contract.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help=f"where the schemas live (default {SCHEMA_DIR})")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.dir)
        if problems:
            print(f"JSON Schemas in {args.dir} are stale:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            print(f"regenerate them with: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"JSON Schemas in {args.dir} are up to date")
        return 0
    changed = write(args.dir)
    print(f"wrote {len(rendered())} schemas to {args.dir}" + (f" ({len(changed)} changed)" if changed else " (no changes)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
