"""Who may say what on the broker: one NATS user per role, with subject permissions.

NATS's own model (docs.nats.io, "Authorization"): one account (JetStream's
streams live in it), a users list in the server config, and per user an allow
list for publish and for subscribe. Anything not allowed is refused by the
server; a connection with no credentials is refused too.

Users authenticate with a user name and a password (nats-py supports that
natively; NKeys would need the `nkeys` package, creds files a NATS operator
set-up). `weft up` makes a random password per role on first start, keeps each
in a 0600 file under its home, and writes the server config (also 0600) from
them. A deployment passes them to nats-server as environment variables, which
infra/nats.conf references (`$WEFT_NATS_WORKER_PASSWORD`): no password is
written into a file that is checked in.

Roles (`ROLES`) and what each may do is below in `permissions`. The JetStream
API is itself subjects (`$JS.API.>`), so "may consume stream S through durable
D" is a handful of API subjects for S and D; acks go to `$JS.ACK.<S>.<D>.>`.
Each role gets its own reply prefix (`_INBOX_<role>`), so one role cannot
listen in on another's replies: pulled messages arrive on the puller's inbox.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from contracts import subjects as s

__all__ = ["ROLES", "authorization_block", "ensure_passwords", "inbox_prefix", "permissions", "role_for"]

ADMIN = "admin"
WORKER = "worker"
ORCHESTRATOR = "orchestrator"
GATEWAY = "gateway"
PUBLISHER = "publisher"
DEADLETTERS = "deadletters"
ROLES = (ADMIN, WORKER, ORCHESTRATOR, GATEWAY, PUBLISHER, DEADLETTERS)

# Durable consumer names (kept equal to the services' own constants: test_nats_auth checks it).
WORKER_DURABLE = "workers"
ORCHESTRATOR_DURABLE = "orchestrator"
TRIGGERS_DURABLE = "triggers"
DLQ_DURABLE = "deadletters"
MAX_DELIVER_DURABLE = "deadletters-maxdeliver"
ADVISORY_STREAM = "WEFT_ADVISORIES"

# service part (services/stack.py ALL) -> the role it runs as when alone
_PART_ROLE = {
    "worker": WORKER, "orchestrator": ORCHESTRATOR, "relay": ORCHESTRATOR, "projector": ORCHESTRATOR,
    "gateway": GATEWAY, "triggers": GATEWAY, "scheduler": GATEWAY, "deadletters": DEADLETTERS,
}


def role_for(parts: tuple[str, ...] | list[str] | set[str]) -> str:
    """The least role that can run all of `parts` in one process (admin when they span roles)."""
    roles = {_PART_ROLE.get(p, ADMIN) for p in parts}
    return roles.pop() if len(roles) == 1 else ADMIN


def inbox_prefix(role: str) -> str:
    return f"_INBOX_{role}"


def _consume(stream: str, durable: str) -> list[str]:
    """What binding to a durable pull consumer and acking its messages takes. Weft's consumers
    take no filter subject, so the CREATE form with one (`...CREATE.<S>.<D>.<filter>`) is not
    allowed: a role cannot narrow its shared durable to starve the other step types."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def permissions(role: str, namespace: str = "") -> dict[str, list[str]]:
    """{"publish": [...], "subscribe": [...]} for `role`, with the namespace's prefix and stream suffix."""
    if role not in ROLES:
        raise ValueError(f"unknown broker role {role!r}; one of {', '.join(ROLES)}")
    if role == ADMIN:  # `weft up`'s own process and `weft broker init`: makes streams, reprocesses anything
        return {"publish": [">"], "subscribe": [">"]}
    p = f"{namespace}." if namespace else ""
    sfx = f"_{namespace.upper()}" if namespace else ""

    def stream(name: str) -> str:
        return f"{name}{sfx}"

    steps, results, triggers, dlq = (f"{p}{x}.>" for x in (s.STEPS_PREFIX, s.RESULTS_PREFIX, s.TRIGGERS_PREFIX,
                                                           s.DLQ_PREFIX))
    poison = f"{p}{s.dlq_subject('poison')}"
    pub: list[str]
    if role == WORKER:
        # Take step commands, give back results; garbage commands go to the DLQ as poison.
        pub = [results, poison, *_consume(stream(s.STEPS_STREAM), WORKER_DURABLE)]
    elif role == ORCHESTRATOR:
        # The reverse: take results, publish step commands (the relay).
        pub = [steps, poison, *_consume(stream(s.RESULTS_STREAM), ORCHESTRATOR_DURABLE)]
    elif role == GATEWAY:
        # Triggers in (HTTP, webhooks, cron) and their consumer; reprocessing a dead letter republishes
        # it to the subject it came from, so the gateway may publish on every work subject.
        pub = [triggers, dlq, steps, results, *_consume(stream(s.TRIGGERS_STREAM), TRIGGERS_DURABLE)]
    elif role == PUBLISHER:  # an outside system that only sends trigger events
        pub = [triggers]
    else:  # DEADLETTERS: its own streams, and moving a message that hit MaxDeliver out of its queue
        adv = stream(ADVISORY_STREAM)
        pub = [dlq, *_consume(stream(s.DLQ_STREAM), DLQ_DURABLE), *_consume(adv, MAX_DELIVER_DURABLE),
               f"$JS.API.STREAM.CREATE.{adv}", f"$JS.API.STREAM.UPDATE.{adv}", f"$JS.API.STREAM.INFO.{adv}"]
        for source in (s.STEPS_STREAM, s.RESULTS_STREAM, s.TRIGGERS_STREAM):
            pub += [f"$JS.API.STREAM.MSG.GET.{stream(source)}", f"$JS.API.STREAM.MSG.DELETE.{stream(source)}"]
    return {"publish": pub, "subscribe": [f"{inbox_prefix(role)}.>"]}


def authorization_block(passwords: dict[str, str], namespace: str = "", *, indent: str = "") -> str:
    """The `authorization { users = [...] }` block of a nats-server config.

    A password value that starts with `$` is written bare: a NATS config variable, which the
    server takes from its environment (and refuses to start without)."""
    def value(v: str) -> str:
        return v if v.startswith("$") else json.dumps(v)

    lines = [f"{indent}authorization {{", f"{indent}  users = ["]
    for role in ROLES:
        if role not in passwords:
            continue
        perms = permissions(role, namespace)
        lines += [
            f"{indent}    {{",
            f"{indent}      user: {json.dumps(role)}",
            f"{indent}      password: {value(passwords[role])}",
            f"{indent}      permissions: {{",
            f"{indent}        publish: {{ allow: {json.dumps(perms['publish'])} }}",
            f"{indent}        subscribe: {{ allow: {json.dumps(perms['subscribe'])} }}",
            f"{indent}      }}",
            f"{indent}    }}",
        ]
    lines += [f"{indent}  ]", f"{indent}}}"]
    return "\n".join(lines)


def password_file(directory: Path, role: str) -> Path:
    return directory / f"{role}.password"


def ensure_passwords(directory: Path) -> dict[str, Path]:
    """A random password per role in `directory` (0700), each in its own 0600 file; made once, then kept."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    files: dict[str, Path] = {}
    for role in ROLES:
        path = password_file(directory, role)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        os.chmod(path, 0o600)
        files[role] = path
    return files


def read_password(path: Path | str) -> str:
    return Path(path).read_text().strip()
