"""Projections: status views built from the notification log.

Each view follows the log from its own tracked position and writes its rows and
that position in one transaction, so every event is applied exactly once even
across crashes. Views may be dropped and rebuilt from position 0 at any time.
Imports: contracts and services.store; nothing imports a projection but entry
points and read paths (CLI, gateway).
"""

from services.projections.executions import ExecutionsView
from services.projections.runner import Projection, Projector

__all__ = ["ExecutionsView", "Projection", "Projector"]
