"""Dead letters: the store of what failed for good, its view, and the acts on it.

What lives here:
  ingest.py        Ingester (DLQ stream -> `DeadLetterRecorded` in the store, ack after
                   commit) and MaxDeliverCapture (JetStream MaxDeliver advisories ->
                   the abandoned message, dead-lettered as kind `max_deliver`)
  nats_archive.py  the NATS side of the capture (advisory stream, get/delete by sequence)
  view.py          queries on the dead-letter view (services.projections.deadletters builds
                   it): list, find by id or prefix, counts, clusters by error, refresh
  actions.py       Actions: reprocess (step: a new attempt through the core; message:
                   republish) and discard, each recorded as an event; PatchError
  metrics.py       the `weft.dlq.open` OpenTelemetry gauge and its Prometheus text
  service.py       DeadLetterService: the "deadletters" part of `weft up`

Who may import it: entry points and read paths (the stack wiring, the CLI, an
HTTP API). It imports contracts, the broker and store ports, and the
orchestrator's execution service (to reprocess through the core); nothing of
the orchestrator or worker imports it.
"""

from services.deadletters.actions import Actions, Outcome, PatchError
from services.deadletters.service import DeadLetterService
from services.deadletters.view import DeadLettersView, Filters, find, list_dead_letters, refresh

__all__ = [
    "Actions",
    "DeadLetterService",
    "DeadLettersView",
    "Filters",
    "Outcome",
    "PatchError",
    "refresh",
    "find",
    "list_dead_letters",
]
