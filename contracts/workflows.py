"""The workflow registry's event: a published, immutable, content-hashed version."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class WorkflowPublished(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["WorkflowPublished"] = "WorkflowPublished"
    schema_version: int = 1
    at: datetime
    name: str
    version: int
    content_hash: str
    definition: dict[str, Any]
