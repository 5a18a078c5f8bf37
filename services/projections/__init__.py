"""Projections: status views built from the notification log.

Each view follows the log from its own tracked position and writes its rows and
that position in one transaction, so every event is applied exactly once even
across crashes. A view is rebuilt from position 0 into shadow tables and
swapped in atomically, while reads and the live view carry on.

What lives here:
  runner.py      Projector (batched catch-up of many views), the Projection protocol,
                 the `weft_projections` table (position, version, rate, rebuild state),
                 catch_up (one-off, before a command reads a view), prepare (set views up)
  log.py         reading the notification log in batches, inside the view transaction
  pipeline.py    overlapping a batch's writes with the next view's Python work
  tables.py      TableView/TableSpec (declared tables), batched upserts, time helpers
  executions.py  ExecutionsView + list_executions / get_execution / lineage
  steps.py       StepRunsView + step_runs (every attempt)
  timeline.py    TimelineView + timeline (every event, one line each)
  stats.py       WorkflowStatsView + workflow_stats (counts, p50/p95, failure rate)
  deadletters.py DeadLettersView (one row per dead letter; its queries: services.deadletters.view)
  rebuild.py     rebuild(store, view): shadow tables + atomic swap
  status.py      projection_status(store, views): position, head, lag, rate

Imports: contracts and services.store (and services.faults); nothing imports a
projection but entry points and read paths (CLI, gateway, replay).
"""

from __future__ import annotations

from typing import Any

from services.projections.deadletters import DeadLettersView
from services.projections.executions import ExecutionsView, get_execution, lineage, list_executions
from services.projections.rebuild import RebuildBusy, RebuildResult, rebuild
from services.projections.runner import Projection, Projector, catch_up, prepare
from services.projections.stats import WorkflowStatsView, workflow_stats
from services.projections.status import projection_status
from services.projections.steps import StepRunsView, step_runs
from services.projections.timeline import TimelineView, timeline


def default_views(prefix: str = "weft_") -> list[Any]:
    """The built-in views, as `weft up` and `weft projector` run them.

    Another table prefix gives an independent second set (named `view:<prefix><name>`),
    which tests use to compare a rebuilt view with one followed live.
    """
    views = [ExecutionsView, StepRunsView, TimelineView, WorkflowStatsView, DeadLettersView]
    if prefix == "weft_":
        return [cls() for cls in views]
    return [cls(prefix=prefix, name=f"view:{prefix}{cls.name.removeprefix('view:')}") for cls in views]


def view_named(name: str, views: list[Any] | None = None) -> Any:
    """A built-in view by name: `executions` or `view:executions`. KeyError lists the known ones."""
    views = default_views() if views is None else views
    wanted = name if name.startswith("view:") else f"view:{name}"
    for view in views:
        if view.name == wanted:
            return view
    known = ", ".join(v.name.removeprefix("view:") for v in views)
    raise KeyError(f"no view named {name!r} (known: {known})")


__all__ = [
    "DeadLettersView", "ExecutionsView", "Projection", "Projector", "RebuildBusy", "RebuildResult", "StepRunsView", "TimelineView",
    "WorkflowStatsView", "catch_up", "default_views", "get_execution", "lineage", "list_executions", "prepare",
    "projection_status", "rebuild", "step_runs", "timeline", "view_named", "workflow_stats",
]
