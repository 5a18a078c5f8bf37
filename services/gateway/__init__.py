"""The HTTP gateway: Weft's front door over HTTP (FastAPI, served by uvicorn in the stack's loop).

What lives here:
  app.py                 the FastAPI app and its Context (what routes use), /healthz, /readyz, OpenAPI
  routes_workflows.py    /v1/workflows: publish, list, get (versions are immutable, content-hashed)
  routes_executions.py   /v1/executions: start (Idempotency-Key), get, list, cancel/pause/resume/retry,
                         history, live events (Server-Sent Events)
  routes_triggers.py     /v1/triggers (publish CloudEvents), /v1/triggers/types, /v1/webhooks/{path}, /v1/keys
  events_in.py           CloudEvents over HTTP: content modes (structured, binary, batch, JSON shorthand),
                         who may publish what, a batch published event by event (contracts/cloudevents.py decodes)
  routes_replay.py       /v1/executions/{id}/replay, /v1/replays (bulk), /v1/backfills (over services.replay)
  routes_deadletters.py  /v1/deadletters: list (or clusters), show, reprocess, discard, stats
                         (over services.deadletters, as `weft dlq` is)
  routes_views.py        /v1/whoami, /v1/executions/{id}/at/{n} (state as of event N), /v1/changes (a live
                         feed of status changes for lists), /v1/stats/workflows, /v1/projections (+ rebuild)
  console/               the operator's console at /ui (Jinja2 pages + plain JS over /v1), /v1/docs offline
                         (Swagger UI from the fastapi-offline package), and the guard: CSP, no framing,
                         cross-site unsafe requests refused
  auth.py                API-key authentication and per-route scopes
  keys.py                API keys as events in the store (hashed; prefix in clear)
  errors.py              the error model, handlers, and the body-size limit
  models.py              request/response bodies (the OpenAPI schemas)
  server.py              GatewayServer (uvicorn in the running loop) and `front_door`, the wiring of the
                         trigger consumer, the cron scheduler and the gateway for services.stack

Who may import it: entry points (services.stack, the CLI), tests. It imports
services.triggers, the orchestrator's application services, projections'
read functions, services.deadletters, the store and the broker port. keys.py imports no web framework,
so the CLI can manage keys without loading FastAPI.
"""
