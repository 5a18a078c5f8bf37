"""Triggers: how events from outside start workflows.

What lives here:
  routing.py    the catalog of published workflows (latest version of each) kept
                fresh from the event store, and the routing rules: `on: [{event}]`
                subscriptions with their `filter`, webhook paths, cron specs; the
                subscribed types a producer may send (`subscribed_types`)
  ingest.py     the one write path every trigger takes: a batch of CloudEvents in,
                their `TriggerAccepted` records and the executions they start
                appended in ONE store transaction; duplicates detected by the store
  consumer.py   the trigger consumer: pulls CloudEvents from the WEFT_TRIGGERS
                stream (`weft.triggers.<type>`) in either mode of the NATS binding
                (contracts/cloudevents.py), dead-letters invalid and
                unroutable ones, ingests the rest, acks after the commit
  publish.py    building and publishing a CloudEvent onto its topic (CLI, gateway)
  cron.py       the cron scheduler: one execution per tick, however many run
  webhooks.py   webhook signatures (HMAC-SHA256) and the request -> CloudEvent

Exactly once, forever: a trigger's (source, id) names both its trigger-log
stream and, with the workflow name, the execution it starts, so any repeat
of the event collides on the store's unique (stream, version=1).

Who may import it: entry points (services.stack, the CLI), the gateway, tests
and benchmarks. It imports contracts, the orchestrator's pure core and
registry, the store and the broker port; nothing in the core imports it.
"""
