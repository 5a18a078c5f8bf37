"""Typed settings for every service: defaults < environment (WEFT_*) < flags.

Built once at an entry point and passed down; there is no global instance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

T = TypeVar("T", bound="Settings")

if TYPE_CHECKING:
    from contracts.payloads import PayloadLimits


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Path(".weft")
    database_url: str | None = None  # default: sqlite file in home
    # The broker: nats://host:port[,...] (NATS JetStream; the default, `weft up` starts one) or
    # kafka://host:port[,host:port...] (an existing Kafka). Unset: nats_url, else what `weft up` wrote.
    broker_url: str | None = None
    nats_url: str | None = None  # default: what `weft up` wrote into home
    kafka_partitions: int = Field(8, ge=1, le=1024)  # of each topic Weft creates (the DLQ's: 1)
    namespace: str = ""  # prefixes broker streams and subjects
    # Copies of each stream in a NATS cluster (1-5): 3 survives the loss of any one node.
    # Applied when the streams are created or updated; a single server accepts only 1.
    nats_replicas: int = Field(1, ge=1, le=5)
    worker_concurrency: int = 16
    worker_id: str | None = None
    # Seconds before an unacked command or result is handed to another consumer. Short, because
    # a held message's lease is renewed (in-progress acks) every ack_wait/3 while its process
    # lives: this is how long a SIGKILLed worker's step waits. Too short for a process whose
    # event loop stalls that long, and its work is run twice (harmless, idempotent, but wasted).
    ack_wait: float = 4.0
    # Seconds a stopping service (SIGTERM) gives the work it holds before handing it back;
    # past it (+5 s for closing connections) the process exits whatever is down.
    drain_grace: float = 10.0
    max_deliver: int = 20
    # deliveries of one message that may each have killed its consumer before it is poison: not
    # handled again but dead-lettered (services/broker/redelivery.py). 0: off
    poison_deliveries: int = 5
    # seconds a result's message id is kept for dedup; at least ack_wait x max_deliver (orchestrator/inbox.py)
    inbox_retention: float = 7 * 86400.0
    result_batch: int = 256
    relay_batch: int = 512
    projection_batch: int = 10_000  # events per projector transaction
    poll_interval: float = 0.05
    http_allow_private: bool = False
    nats_port: int = 0  # 0 = a free port
    gateway_port: int = 0
    gateway_host: str = "127.0.0.1"
    gateway_auth: bool = True  # `weft up` turns it off on a loopback host unless set explicitly
    gateway_max_body: int = 1024 * 1024  # bytes; larger bodies get 413 (bodies that carry payloads: below)
    gateway_max_streams: int = 100  # live SSE streams (/v1/changes, /v1/executions/{id}/events) open at once
    # The payload policy (contracts/payloads.py). Up to the inline limit a value travels inside
    # events and messages; up to the maximum it is stored once in the blob store and travels as a
    # reference; over the maximum it is refused. Bytes of compact JSON.
    payload_inline_limit: int = 256 * 1024
    payload_max: int = 64 * 1024 * 1024
    trigger_batch: int = 500  # trigger events ingested per store transaction
    cron_grace: float = 60.0  # seconds a late cron tick still counts as on time
    no_worker: bool = False  # `weft up` without its in-process worker
    # Worker processes `weft up` runs beside itself (0: the worker runs inside its process);
    # unset: weft.workers.default_processes() for this machine.
    worker_processes: int | None = Field(None, ge=0, le=64)
    # Broker credentials (services/broker/nats_auth.py). The password directly, or better a file
    # holding it (0600). Unset, they come from the stack file `weft up` wrote, for nats_role.
    nats_user: str | None = None
    nats_password: str | None = None
    nats_password_file: Path | None = None
    nats_role: str | None = None  # which of the stack's users to take; the CLI sets it per command
    webhook_tolerance: float = 300.0  # seconds a signed webhook's timestamp may be off (either way)
    # What step code may do (services/worker/steps/allowlist.py, services/worker/secrets.py, ssrf.py).
    # Modules `python` steps may call, comma-separated ("shop.steps,billing"); a module allows its
    # submodules. Unset: `weft up` allows the modules in its working directory, other workers none.
    step_modules: str | None = None
    secrets_dir: Path | None = None  # one file per secret, named after it (Docker/Kubernetes secrets)
    # Hosts (or host:port) `http` steps may reach although they resolve to private addresses.
    http_allowed_hosts: str = ""
    # A standalone service serves /metrics, /healthz and /readyz on this port (0: a free one;
    # unset: none). `weft up` and `weft gateway` serve /metrics on the gateway as well.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for Prometheus and the healthcheck

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value.startswith("kafka://"):
            from services.broker.kafka import parse_url

            parse_url(value)  # ValueError names the part that is wrong
        elif not value.startswith(("nats://", "tls://")):
            raise ValueError("must start with nats:// (NATS JetStream) or kafka:// (Kafka), "
                             f"got {value[:60]!r}")
        return value

    def broker(self) -> str | None:
        """The broker URL the services use: broker_url, else nats_url."""
        return self.broker_url or self.nats_url

    def broker_kind(self) -> str:
        return "kafka" if (self.broker() or "").startswith("kafka://") else "nats"

    @field_validator("step_modules")
    @classmethod
    def _module_names(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from services.worker.steps.allowlist import parse_modules

        return ",".join(parse_modules(value))

    @field_validator("http_allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        from services.worker.steps.ssrf import parse_allowed_hosts

        return ",".join(parse_allowed_hosts(value))

    @field_validator("poison_deliveries")
    @classmethod
    def _before_max_deliver(cls, value: int, info: ValidationInfo) -> int:
        from services.broker.redelivery import TIMER_ALLOWANCE

        most = info.data.get("max_deliver", 20) - TIMER_ALLOWANCE - 1
        if value < 0 or value > most:
            raise ValueError(f"must be between 0 (off) and max_deliver - {TIMER_ALLOWANCE + 1} = {most}: the "
                             "broker gives up on a message after max_deliver deliveries")
        return value

    @field_validator("inbox_retention")
    @classmethod
    def _outlasts_redelivery(cls, value: float, info: ValidationInfo) -> float:
        window = info.data.get("ack_wait", 4.0) * info.data.get("max_deliver", 20)
        if value < window:
            raise ValueError(f"must be at least ack_wait x max_deliver = {window:.0f}s, or a redelivered "
                             "result could be applied twice")
        return value

    @field_validator("webhook_tolerance")
    @classmethod
    def _positive_tolerance(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("must be between 1 and 86400 seconds")
        return value

    def nats_credentials(self) -> dict[str, str]:
        """user and password for NatsTransport.connect, or nothing when the broker takes none."""
        if not self.nats_user:
            return {}
        password = self.nats_password
        if password is None and self.nats_password_file is not None:
            try:
                password = self.nats_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"nats_password_file={str(self.nats_password_file)!r}: {exc.strerror}") from None
        return {"user": self.nats_user, "password": password or ""}

    @model_validator(mode="after")
    def _payload_limits(self: T) -> T:
        try:  # the inline limit must leave the broker room for the envelope, the maximum be above it
            self.payload_limits()
        except ValueError as exc:
            raise ValueError(f"WEFT_PAYLOAD_INLINE_LIMIT / WEFT_PAYLOAD_MAX: {exc}") from None
        return self

    def payload_limits(self) -> "PayloadLimits":
        from contracts.payloads import PayloadLimits

        return PayloadLimits(inline=self.payload_inline_limit, maximum=self.payload_max)

    @classmethod
    def load(cls: type[T], env: Mapping[str, str] | None = None, **flags: Any) -> T:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(f"WEFT_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = raw
        from_env = set(values)
        flags = {k: v for k, v in flags.items() if v is not None}
        values.update(flags)
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                if not err["loc"]:  # a rule over several settings says which itself
                    problems.append(str(err["msg"]).removeprefix("Value error, "))
                    continue
                name = str(err["loc"][0])
                where = f"WEFT_{name.upper()}" if name in from_env and name not in flags else name
                problems.append(f"{where}={values.get(name)!r}: {err['msg']}")
            raise ValueError("; ".join(problems)) from None
        return settings.with_stack()

    def with_stack(self: T) -> T:
        """Fill what is unset from the stack file `weft up` wrote into home."""
        stack = read_stack(self.home)
        update: dict[str, Any] = {}
        if self.database_url is None:
            update["database_url"] = stack.get("database_url") or f"sqlite:///{(self.home / 'weft.db').resolve()}"
        if self.broker_url is None and self.nats_url is None and stack.get("broker_url"):
            update["broker_url"] = stack["broker_url"]
        if self.nats_url is None and stack.get("nats_url"):
            update["nats_url"] = stack["nats_url"]
        # stack.json names each role's password file (0600), never a password.
        users = stack.get("nats_users") or {}
        if self.nats_user is None and users:
            role = self.nats_role or "admin"
            if role in users:
                update["nats_user"] = role
                if self.nats_password is None and self.nats_password_file is None:
                    update["nats_password_file"] = Path(users[role])
        return self.model_copy(update=update)


def stack_file(home: Path) -> Path:
    return home / "stack.json"


def read_stack(home: Path) -> dict[str, Any]:
    try:
        return orjson.loads(stack_file(home).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}


def write_stack(home: Path, info: dict[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = stack_file(home).with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    tmp.replace(stack_file(home))
