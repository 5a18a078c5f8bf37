"""`weft workflows publish|list|show`: register and inspect workflow versions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from weft.cli import output as out
from weft.cli.common import (
    HomeOpt,
    JsonOpt,
    code_first,
    is_code_first,
    published,
    read_definition,
    store_for,
    workflow_ref,
    workflows_app,
)


@workflows_app.command("publish")
def workflows_publish(
    file: str = typer.Argument(..., metavar="FILE|MODULE:WORKFLOW",
                               help="A YAML/JSON definition, or a code-first weft.Workflow (examples.orders:orders)."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Register a version: immutable, content-hashed; identical content is a no-op."""
    from services.orchestrator.registry import Registry

    wf = code_first(file, home) if is_code_first(file) else read_definition(Path(file), home)
    with store_for(home) as store:
        v = Registry(store).publish(wf)
    out.emit({"id": f"{v.name}@{v.version}", "workflow": v.name, "version": v.version,
              "content_hash": v.content_hash, "created": v.created}, as_json)


@workflows_app.command("list")
def workflows_list(as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Every workflow with its latest version."""
    from services.orchestrator.registry import Registry

    with store_for(home) as store:
        reg = Registry(store)
        rows = []
        for name in reg.names():
            v = reg.get(name)
            rows.append({"id": name, "workflow": name, "version": v.version, "content_hash": v.content_hash,
                         "published_at": v.published_at.isoformat()})
    out.emit(rows, as_json, render=lambda rs: out.fitted(
        [out.Col("workflow", key=True), out.Col("latest", key=True), out.Col("published", drop=1),
         out.Col("content hash", key=True, drop=2)],
        [[r["workflow"], f"{r['workflow']}@{r['version']}", r["published_at"][:19].replace("T", " "),
          r["content_hash"]] for r in rs]) if rs else out.console.print("(no workflows published yet)"))


@workflows_app.command("show")
def workflows_show(name: str = typer.Argument(..., metavar="NAME[@VERSION]|MODULE:WORKFLOW"),
                   version: Optional[int] = typer.Option(None, "--version", min=1, help="Same as NAME@VERSION."),
                   as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """One version's definition (the latest unless NAME@VERSION); for MODULE:WORKFLOW, the YAML a
    code-first workflow compiles to (no stack)."""

    if is_code_first(name):
        wf = code_first(name, home)
        if as_json:
            out.emit({"workflow": wf.name, "content_hash": wf.content_hash(), "definition": wf.canonical()}, True)
        else:
            import yaml

            sys.stdout.write(f"# {wf.name}  {wf.content_hash()}\n")
            sys.stdout.write(yaml.safe_dump(wf.canonical(), sort_keys=False, allow_unicode=True))
        return

    wanted, number = workflow_ref(name, "NAME", version)
    with store_for(home) as store:
        v = published(store, wanted, number)
    out.emit({"id": f"{v.name}@{v.version}", "workflow": v.name, "version": v.version,
              "content_hash": v.content_hash, "definition": v.definition.canonical()}, as_json)
