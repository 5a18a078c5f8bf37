"""Records of bulk operations (bulk replay, backfill): who ran what, and how it ended.

Each operation has an id (derived from its parameters, or given) and one stream
in the event store, `operation_stream(id)`; every run of it appends an
`OperationStarted` and, when it stops, an `OperationFinished` with its counts.
The executions an operation starts have ids derived from (operation id, item),
which is what makes running it again start nothing twice; these records are the
audit trail beside them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

_NS = uuid.UUID("9f3b7c1d-5e2a-4b6f-8c0d-1a2b3c4d5e6f")
OperationKind = Literal["replay", "backfill"]


def operation_stream(operation_id: str) -> uuid.UUID:
    return uuid.uuid5(_NS, f"operation\x00{operation_id}")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str  # each record narrows it (and keeps it first in the stored JSON)
    schema_version: int = 1
    at: datetime
    operation_id: str
    kind: OperationKind


class OperationStarted(_Record):
    type: Literal["OperationStarted"] = "OperationStarted"
    params: dict[str, Any]  # what was asked (filter, time range, version, patch...)
    total: int  # items selected
    by: str = "user"


class OperationFinished(_Record):
    type: Literal["OperationFinished"] = "OperationFinished"
    counts: dict[str, int]  # started, skipped, failed
    cancelled: bool = False
    failures: list[dict[str, Any]] = []  # the items that failed to start, with why (at most 100)
