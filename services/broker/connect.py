"""`connect_transport(settings)`: the one way every service and CLI command reaches its broker.

The URL's scheme picks the adapter: `kafka://` is `KafkaTransport`, `nats://` (the default)
`NatsTransport` with the role's credentials. Both load lazily, so a deployment needs only the
client of the broker it runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from services.broker.ports import BrokerError, Transport

if TYPE_CHECKING:
    from services.settings import Settings

NO_BROKER = ("no broker: run `weft up` (its home folder tells the services where), or set WEFT_BROKER_URL "
             "(nats://host:port or kafka://host:port[,host:port...])")


async def connect_transport(settings: Settings, *, connect_timeout: float = 10.0, **kw: Any) -> Transport:
    """A connected transport on the settings' broker (`Settings.broker()`). BrokerError when it
    cannot be reached, ValueError when none is configured."""
    url = settings.broker()
    if not url:
        raise ValueError(NO_BROKER)
    if url.startswith("kafka://"):
        try:
            from services.broker.kafka import KafkaTransport
        except ImportError as exc:  # pragma: no cover - the kafka extra is not installed
            raise BrokerError("kafka:// needs aiokafka: pip install 'weft[kafka]'", operation="connect") from exc
        kw.pop("replicas", None)
        # cast: each adapter's consumer() returns its own consumer, whose fetch() returns a list of
        # its own deliveries, and lists are invariant to mypy; the contract suite proves the shape.
        return cast(Transport, await KafkaTransport.connect(url, namespace=settings.namespace,
                                                            connect_timeout=connect_timeout,
                                                            partitions=settings.kafka_partitions, **kw))
    from services.broker.nats import NatsTransport

    kw.setdefault("replicas", settings.nats_replicas)
    credentials: dict[str, Any] = dict(settings.nats_credentials())
    return cast(Transport, await NatsTransport.connect(url, namespace=settings.namespace,
                                                       connect_timeout=connect_timeout, **credentials, **kw))
