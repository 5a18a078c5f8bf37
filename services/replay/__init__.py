"""Replay, bulk replay, backfill and time travel: running history again.

What lives here:
  replay.py      plan_replay / replay_execution: one execution again (same or
                 another version, from a step, with an input patch, dry run)
  bulk.py        bulk_replay: every execution a filter selects, as one
                 idempotent operation (ids derived from operation id + source)
  backfill.py    backfill: recorded trigger events of a time range through a
                 workflow version, at most one execution per event per backfill id
  operations.py  operation ids and their OperationStarted/Finished records
  timetravel.py  state_at: an execution as of event N or of a time

These are plain blocking functions over an EventStore, for the CLI
(weft/cli/history.py) and the HTTP API alike; they start executions only
through `Executions.start`. Imports: contracts, services.orchestrator,
services.store, services.projections (to select from the executions view) and
services.triggers.routing (the filter semantics). Nothing imports this package
but entry points.
"""

from __future__ import annotations

from services.replay.backfill import BackfillError, backfill, parse_workflow
from services.replay.bulk import ReplayFilter, bulk_replay, parse_filter, parse_time
from services.replay.operations import history as operation_history
from services.replay.replay import ReplayError, ReplayPlan, parse_version, plan_replay, replay_execution
from services.replay.timetravel import AtError, parse_at, state_at

__all__ = [
    "AtError", "BackfillError", "ReplayError", "ReplayFilter", "ReplayPlan", "backfill", "bulk_replay",
    "operation_history", "parse_at", "parse_filter", "parse_time", "parse_version", "parse_workflow",
    "plan_replay", "replay_execution", "state_at",
]
