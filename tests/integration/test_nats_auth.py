"""The broker requires credentials, and each role reaches only its subjects (a real nats-server)."""

from __future__ import annotations

import asyncio
import gc
import stat
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest

from contracts.subjects import STEPS_STREAM, TRIGGERS_STREAM, step_subject, trigger_subject
from services.broker import BrokerError, NatsTransport
from services.broker import nats_auth
from services.broker.nats_server import NatsServer
from services.broker.ports import OutMessage
from tests.fixtures_nats import start_nats_server
from tests.support import stack_up, wait_until

pytestmark = pytest.mark.integration
NAMESPACE = "auth"


class _AuthServer:
    def __init__(self, server: NatsServer, files: dict[str, Path]):
        self.server, self.files = server, files

    def password(self, role: str) -> str:
        return nats_auth.read_password(self.files[role])

    async def connect(self, role: str, **kw: Any) -> NatsTransport:
        return await NatsTransport.connect(self.server.url, namespace=NAMESPACE, user=role,
                                           password=self.password(role), connect_timeout=5, **kw)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_AuthServer]:
    home = tmp_path_factory.mktemp("nats-auth")
    files = nats_auth.ensure_passwords(home / "auth")
    server = NatsServer(home / "store", passwords={r: nats_auth.read_password(p) for r, p in files.items()},
                        namespace=NAMESPACE)
    try:
        server.start()
    except Exception:  # noqa: BLE001 - same policy as the shared fixture
        start_nats_server(home / "never")  # skips (fails under CI) with the reason
        raise
    try:
        yield _AuthServer(server, files)
    finally:
        server.stop()


@pytest.fixture
async def admin(auth_server: _AuthServer) -> AsyncIterator[NatsTransport]:
    t = await auth_server.connect("admin")
    await t.ensure_streams()
    try:
        yield t
    finally:
        await t.close()


def test_credentials_are_private_and_kept(auth_server: _AuthServer) -> None:
    for path in [*auth_server.files.values(), auth_server.server.config_path]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(auth_server.files["admin"].parent.stat().st_mode) == 0o700
    before = {r: auth_server.password(r) for r in nats_auth.ROLES}
    nats_auth.ensure_passwords(auth_server.files["admin"].parent)  # a second start keeps them
    assert {r: auth_server.password(r) for r in nats_auth.ROLES} == before
    assert len(set(before.values())) == len(before)


async def test_anonymous_and_wrong_password_are_refused(auth_server: _AuthServer) -> None:
    # Refused credentials are not an outage: not retryable, so a service says so instead of waiting.
    with pytest.raises(BrokerError, match="refused no credentials") as anonymous:
        await NatsTransport.connect(auth_server.server.url, connect_timeout=2)
    assert anonymous.value.retryable is False
    with pytest.raises(BrokerError, match="refused user 'worker'") as guessed:
        await NatsTransport.connect(auth_server.server.url, user="worker", password="guess", connect_timeout=2)
    assert guessed.value.retryable is False
    gc.collect()  # a socket left open by a refused connect would warn here (warnings are errors)
    # On the wire, as an attacker would try it: CONNECT without credentials, then a publish.
    reader, writer = await asyncio.open_connection(auth_server.server.host, auth_server.server.port)
    try:
        assert (await reader.readline()).startswith(b"INFO")
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPUB auth.weft.steps.python 2\r\n{}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 5)
        assert answer.startswith(b"-ERR 'Authorization Violation'"), answer
    finally:
        writer.close()
        await writer.wait_closed()


async def _refused(nc: Any, subject: str, data: bytes = b"{}") -> None:
    """A JetStream publish the server refuses: the permissions violation leaves it with no ack."""
    js = nc.jetstream(timeout=1.5)
    with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
        await js.publish(subject, data)


async def _worker_client(auth_server: _AuthServer, errors: list[str]) -> Any:
    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(auth_server.server.url, user="worker", password=auth_server.password("worker"),
                              inbox_prefix=nats_auth.inbox_prefix("worker"), error_cb=error_cb,
                              allow_reconnect=False)


async def test_worker_cannot_publish_commands_or_triggers_nor_make_streams(
    auth_server: _AuthServer, admin: NatsTransport
) -> None:
    errors: list[str] = []
    nc = await _worker_client(auth_server, errors)
    try:
        ready = orjson.dumps({"execution_id": str(uuid.uuid4()), "step_id": "x", "step_type": "python",
                              "with": {"callable": "os:system"}, "input": "id"})
        await _refused(nc, f"{NAMESPACE}.{step_subject('python')}", ready)
        await _refused(nc, f"{NAMESPACE}.{trigger_subject('order.created')}")
        await _refused(nc, step_subject("python"), ready)  # outside the namespace neither
        js = nc.jetstream(timeout=1.5)
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
            await js.add_stream(name="EVIL", subjects=["evil.>"])
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):  # nor peek into the trigger log
            await js.get_msg(admin.stream_name(TRIGGERS_STREAM), seq=1)
        # Nor listen in on another role's inbox, where its pulled messages arrive.
        overheard: list[bytes] = []

        async def overhear(msg: Any) -> None:
            overheard.append(msg.data)

        await nc.subscribe("_INBOX_gateway.>", cb=overhear)
        await nc.flush(timeout=2)
        await admin._nc.publish("_INBOX_gateway.x", b"a pulled trigger")
        await admin._nc.flush(timeout=2)
        await nc.flush(timeout=2)
    finally:
        await nc.close()
    assert overheard == []
    assert any("permissions violation for subscription to \"_inbox_gateway.>\"" in e.lower() for e in errors), errors
    assert any("permissions violation for publish" in e.lower() for e in errors), errors
    # Nothing got through: the steps stream holds no message.
    info = await admin._js.stream_info(admin.stream_name(STEPS_STREAM))
    assert info.state.messages == 0


async def test_publisher_may_only_send_triggers(auth_server: _AuthServer, admin: NatsTransport) -> None:
    pub = await auth_server.connect("publisher", publish_retry_for=2)
    try:
        assert await pub.publish(OutMessage(subject=trigger_subject("order.created"), data=b"{}",
                                            msg_id=uuid.uuid4().hex)) in (True, False)
        with pytest.raises(BrokerError):
            await pub.publish(OutMessage(subject=step_subject("python"), data=b"{}"))
    finally:
        await pub.close()


def test_permissions_follow_the_services_names() -> None:
    from services.deadletters import ingest
    from services.deadletters.nats_archive import ADVISORY_STREAM
    from services.orchestrator import consumer
    from services.triggers import consumer as triggers
    from services.worker import runtime

    assert (runtime.DURABLE, consumer.DURABLE, triggers.DURABLE, ingest.DURABLE, ingest.MAX_DELIVER_DURABLE) == (
        nats_auth.WORKER_DURABLE, nats_auth.ORCHESTRATOR_DURABLE, nats_auth.TRIGGERS_DURABLE,
        nats_auth.DLQ_DURABLE, nats_auth.MAX_DELIVER_DURABLE)
    assert ADVISORY_STREAM == nats_auth.ADVISORY_STREAM
    assert nats_auth.role_for(("worker",)) == "worker"
    assert nats_auth.role_for(("orchestrator", "relay")) == "orchestrator"
    assert nats_auth.role_for(("worker", "relay")) == "admin"


def test_compose_nats_conf_matches_the_roles() -> None:
    """infra/nats.conf is `weft broker config` output: it may not drift from the permissions here."""
    conf = (Path(__file__).resolve().parents[2] / "infra" / "nats.conf").read_text()
    block = nats_auth.authorization_block(
        {r: f"$WEFT_NATS_{r.upper()}_PASSWORD" for r in nats_auth.ROLES}
    )
    assert block in conf
    settings = [line.split("#")[0].strip() for line in conf.splitlines()]
    assert not [line for line in settings if line.startswith(("no_auth_user", "accounts"))]


# ---- a workflow through services that each hold only their role ------------------------------------

FLOW = """
name: auth-flow
steps:
  - {id: a, type: transform, with: {expression: "{n: `1`}"}}
  - {id: b, type: transform, needs: [a], with: {expression: "steps.a.output.n"}}
output: "${{ steps.b.output }}"
"""


async def test_workflow_completes_with_each_service_on_its_own_role(
    auth_server: _AuthServer, admin: NatsTransport, tmp_path: Path
) -> None:
    url = auth_server.server.url
    # One SQLite file shared by the stacks (the shared PostgreSQL has few connections to spare).
    db_url = f"sqlite:///{tmp_path / 'weft.db'}"
    creds = {r: {"nats_user": r, "nats_password_file": auth_server.files[r]} for r in nats_auth.ROLES}
    async with stack_up(tmp_path / "w", db_url, url, ["worker"], namespace=NAMESPACE, **creds["worker"]), \
            stack_up(tmp_path / "d", db_url, url, ["deadletters"], namespace=NAMESPACE, **creds["deadletters"]), \
            stack_up(tmp_path / "g", db_url, url, ["triggers"], namespace=NAMESPACE, **creds["gateway"]), \
            stack_up(tmp_path / "o", db_url, url, ["orchestrator", "relay", "projector"], namespace=NAMESPACE,
                     **creds["orchestrator"]) as orch:
        version = orch.publish(FLOW)
        execution_id = await orch.start(version, {})
        state = await orch.finished(execution_id)
        assert state.status == "completed", state
        assert {s.status for s in state.steps.values()} == {"succeeded"}

        async def advisories_captured() -> bool:  # the dead-letter service made its own stream with its role
            try:
                await admin._js.stream_info(admin.stream_name(nats_auth.ADVISORY_STREAM))
                return True
            except nats.js.errors.NotFoundError:
                return False
        await wait_until(advisories_captured, timeout=15)


@pytest.mark.parametrize(("role", "forbidden"), [
    ("orchestrator", "weft.results.some-execution"),  # it may not forge a step's result
    ("orchestrator", "weft.triggers.order.created"),
    ("gateway", "$JS.API.STREAM.CREATE.WEFT_STEPS_AUTH"),
    ("deadletters", "weft.steps.python"),
    ("publisher", "weft.results.some-execution"),
    ("worker", "weft.dlq.trigger_invalid"),  # only its own poison letters
])
async def test_each_role_is_refused_outside_its_subjects(
    auth_server: _AuthServer, admin: NatsTransport, role: str, forbidden: str
) -> None:
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(auth_server.server.url, user=role, password=auth_server.password(role),
                            inbox_prefix=nats_auth.inbox_prefix(role), error_cb=error_cb, allow_reconnect=False)
    try:
        subject = forbidden if forbidden.startswith("$") else f"{NAMESPACE}.{forbidden}"
        await nc.publish(subject, b"{}")
        await nc.flush(timeout=2)
        await nc.flush(timeout=2)  # the server's -ERR has arrived by the second round trip
    finally:
        await nc.close()
    assert any("permissions violation for publish" in e.lower() for e in errors), errors
