"""PostgreSQL backend: eventsourcing's PostgresProcessRecorder (psycopg 3) plus an
inbox table, in one schema.

Events are inserted with one `INSERT ... SELECT FROM unnest(...)` per batch after
the library's `LOCK TABLE stored_events IN EXCLUSIVE MODE`, so notification ids commit in
the order they are issued and a follower reading `position > after` never skips
a row committed later with a lower id (ids may have gaps from rolled-back
transactions; readers must not assume density). Inbox ids and the tracking row
are written in the same transaction, through the `_insert_events` hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing import persistence as es
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresDatastore, PostgresProcessRecorder
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Identifier

from services.store._base import BaseStore, ViewTxBase
from services.store.ports import LogRow, StoreError, StoreUnavailableError
from services.store.reconnect import ReconnectingDatastore

CONNECT_TIMEOUT_S = 10  # first connection (reachability check, CREATE SCHEMA)
POOL_TIMEOUT_S = 5.0  # wait for a pooled connection (the library retries 10x on timeout)


class WeftPostgresRecorder(PostgresProcessRecorder):
    """Process recorder whose insert transaction also records inbox message ids."""

    def __init__(self, datastore: PostgresDatastore) -> None:
        super().__init__(datastore)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {0}.inbox ("
                "message_id text PRIMARY KEY, "
                "recorded_at timestamptz NOT NULL DEFAULT now())"
            ).format(schema)
        )
        # Large payloads, stored once by their SHA-256 (services/store/blobs.py, the claim check).
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {0}.blobs ("
                "sha256 text PRIMARY KEY, size bigint NOT NULL, data bytea NOT NULL, "
                "stored_at timestamptz NOT NULL DEFAULT now())"
            ).format(schema)
        )
        self.insert_inbox_statement = SQL(
            "INSERT INTO {0}.inbox (message_id) SELECT unnest(%s::text[])"
        ).format(schema)
        self.prune_inbox_statement = SQL(
            "DELETE FROM {0}.inbox WHERE message_id IN "
            "(SELECT message_id FROM {0}.inbox WHERE recorded_at < %s LIMIT %s)"
        ).format(schema)
        self.select_inbox_statement = SQL(
            "SELECT message_id FROM {0}.inbox WHERE message_id = ANY(%s::text[])"
        ).format(schema)
        # Parallel arrays with binary parameters: same single INSERT per batch as the
        # library's unnest(composite[]), but ~5x cheaper to encode client-side.
        self.insert_event_arrays_statement = SQL(
            "INSERT INTO {0}.{1} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[]) "
            "RETURNING originator_id, originator_version, notification_id"
        ).format(schema, Identifier(self.events_table_name))
        self.select_max_versions_statement = SQL(
            "SELECT originator_id, MAX(originator_version) AS version FROM {0}.{1} "
            "WHERE originator_id = ANY(%s::uuid[]) GROUP BY originator_id"
        ).format(schema, Identifier(self.events_table_name))

        self.select_many_statement = SQL(
            "SELECT originator_id, originator_version, topic, state FROM {0}.{1} "
            "WHERE originator_id = ANY(%s::uuid[]) ORDER BY originator_id, originator_version"
        ).format(schema, Identifier(self.events_table_name))
        # The log for a view transaction: an index walk over notification_id (no topic filter),
        # stream ids as text (cheaper to decode than UUID objects).
        self.select_log_statement = SQL(
            "SELECT notification_id, originator_id::text, originator_version, topic, state FROM {0}.{1} "
            "WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(schema, Identifier(self.events_table_name))
        self.select_stream_log_statement = SQL(
            "SELECT notification_id, originator_id::text, originator_version, topic, state FROM {0}.{1} "
            "WHERE originator_id = %s AND originator_version <= %s ORDER BY originator_version"
        ).format(schema, Identifier(self.events_table_name))

    def _insert_events(
        self, curs: psycopg.Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        inbox: Sequence[str] = kwargs.get("inbox") or ()
        if inbox:
            curs.execute(self.insert_inbox_statement, (list(inbox),), prepare=True)
        super()._insert_events(curs, stored_events, **kwargs)  # the tracking row

    def _insert_stored_events(
        self, curs: psycopg.Cursor[DictRow], stored_events: Sequence[StoredEvent], **_: Any
    ) -> None:
        self._lock_table(curs)  # the library's LOCK TABLE ... IN EXCLUSIVE MODE
        self._notify_channel(curs)
        curs.execute(
            self.insert_event_arrays_statement,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
            prepare=True,
        )

    def _fetch_ids_after_insert_events(
        self, curs: psycopg.Cursor[DictRow], stored_events: Sequence[StoredEvent], **_: Any
    ) -> Sequence[int] | None:
        # Map ids back by key, so positions follow the input order whatever
        # order RETURNING produces.
        ids = {(r["originator_id"], r["originator_version"]): r["notification_id"] for r in curs.fetchall()}
        return [ids[(e.originator_id, e.originator_version)] for e in stored_events]


@lru_cache(maxsize=512)
def qmark_to_pyformat(sql: str) -> str:
    """'?' placeholders to '%s' (outside quotes), and a literal '%' to '%%'."""
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


_DDL_LOCK = 0x5745_4654_4444  # "WEFTDD": serialises view DDL across processes


class _PostgresViewTx(ViewTxBase):
    dialect = "postgresql"
    _ddl_locked = False

    def _sql(self, sql: str) -> str:
        return qmark_to_pyformat(sql)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        # CREATE ... IF NOT EXISTS is not safe against a concurrent twin in PostgreSQL
        # (both pass the check, one fails on the catalog's unique index). Processes
        # that set up the same view at once take turns: the lock lasts the transaction.
        if not self._ddl_locked and sql.lstrip()[:6].upper() in ("CREATE", "ALTER ", "DROP T", "DROP I"):
            self._ddl_locked = True
            super().execute("SELECT pg_advisory_xact_lock(?)", (_DDL_LOCK,))
        super().execute(sql, params)

    def _read_log(self, after: int, limit: int) -> list[LogRow]:
        self._cursor.execute(self._recorder.select_log_statement, (after, limit), prepare=True)
        return self._cursor.fetchall()

    def _head(self) -> int | None:
        self._cursor.execute(self._recorder.max_notification_id_statement, prepare=True)
        return self._cursor.fetchone()[0]

    def _read_stream(self, stream_id: UUID, upto_version: int) -> list[LogRow]:
        self._cursor.execute(self._recorder.select_stream_log_statement, (stream_id, upto_version), prepare=True)
        return self._cursor.fetchall()


class PostgresStore(BaseStore):
    """`EventStore` on one PostgreSQL schema (created if missing)."""

    dialect = "postgresql"

    def __init__(  # noqa: PLR0913
        self,
        url: str,
        *,
        dbname: str,
        host: str,
        port: int,
        user: str,
        password: str,
        schema: str = "public",
        pool_size: int = 5,
    ) -> None:
        self.schema = schema
        self._search_path = SQL("SET LOCAL search_path TO {0}").format(Identifier(schema))
        # Openers of one schema take turns creating it and its tables (concurrent
        # CREATE OR REPLACE FUNCTION / CREATE TABLE IF NOT EXISTS can fail).
        with _schema_setup_lock(dbname, host, port, user, password, schema):
            self._datastore = ReconnectingDatastore(
                dbname,
                host,
                port,
                user,
                password,
                pool_size=pool_size,
                schema=schema,
                connect_timeout=POOL_TIMEOUT_S,
            )
            try:
                super().__init__(url, WeftPostgresRecorder(self._datastore))
                self._create_tables()
            except BaseException:
                self._datastore.close()
                raise

    @property
    def _pg(self) -> WeftPostgresRecorder:
        return self._recorder  # type: ignore[return-value]

    def _seen(self, message_ids: Sequence[str]) -> set[str]:
        with self._datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._pg.select_inbox_statement, (list(message_ids),), prepare=True)
            return {row["message_id"] for row in curs.fetchall()}

    def _prune_inbox(self, cutoff: datetime, batch: int) -> int:
        with self._datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            curs.execute(self._pg.prune_inbox_statement, (cutoff, batch))
            return int(curs.rowcount)

    def _max_versions(self, stream_ids: Sequence[UUID]) -> dict[UUID, int]:
        with self._datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._pg.select_max_versions_statement, (list(stream_ids),))
            return {row["originator_id"]: int(row["version"]) for row in curs.fetchall()}

    def _load_many(self, stream_ids: Sequence[UUID]) -> list[tuple[Any, ...]]:
        with self._datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._pg.select_many_statement, (list(stream_ids),), prepare=True)
            return list(curs.fetchall())

    @contextmanager
    def _view_transaction(self) -> Iterator[_PostgresViewTx]:
        for attempt in (1, 2):
            scope = ExitStack()
            try:
                conn = scope.enter_context(self._datastore.get_connection())
                scope.enter_context(conn.transaction())
                curs = scope.enter_context(conn.cursor(row_factory=tuple_row))
                # Unqualified view tables live in the store's schema, beside its events.
                curs.execute(self._search_path)
            except (psycopg.OperationalError, es.OperationalError) as exc:
                # Nothing of the caller's has run yet: a connection found dead here is
                # replaced (services/store/reconnect.py) and the transaction begun again.
                # The error goes through the contexts, so the datastore sees it.
                try:
                    scope.__exit__(type(exc), exc, exc.__traceback__)
                except Exception:  # noqa: BLE001 - the same error, as the library renamed it
                    pass
                if attempt == 2:
                    raise
                self._datastore.before_retry()
                continue
            with scope:
                yield _PostgresViewTx(curs, self._recorder)
            return

    def _before_retry(self) -> None:
        self._datastore.before_retry()

    def _close(self) -> None:
        self._datastore.close()


@contextmanager
def _schema_setup_lock(
    dbname: str, host: str, port: int, user: str, password: str, schema: str
) -> Iterator[None]:
    """Check the server is reachable (fast), hold an advisory lock for the schema's
    setup, and create the schema if missing."""
    try:
        conn = psycopg.connect(
            dbname=dbname,
            host=host,
            port=port,
            user=user,
            password=password,
            connect_timeout=CONNECT_TIMEOUT_S,
            autocommit=True,
        )
    except psycopg.OperationalError as exc:
        msg = f"open failed: cannot connect to PostgreSQL at {host}:{port}/{dbname} as {user}: {exc}"
        raise StoreUnavailableError(msg, operation="open", backend="postgresql") from exc
    with conn:
        try:
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"weft.store:{schema}",))
            _create_schema(conn, user, schema)
        except psycopg.OperationalError as exc:
            msg = f"open failed: {type(exc).__name__}: {exc}"
            raise StoreUnavailableError(msg, operation="open", backend="postgresql") from exc
        except psycopg.Error as exc:
            msg = f"open failed: {type(exc).__name__}: {exc}"
            raise StoreError(msg, operation="open", backend="postgresql") from exc
        yield  # the session lock is released when the connection closes


def _create_schema(conn: psycopg.Connection[Any], user: str, schema: str) -> None:
    try:
        conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {0}").format(Identifier(schema)))
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
        pass  # created concurrently by a client that does not take the lock
    except psycopg.errors.InsufficientPrivilege as exc:
        row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if row is None:
            msg = f"open failed: schema {schema!r} does not exist and {user!r} may not create it: {exc}"
            raise StoreError(msg, operation="open", backend="postgresql") from exc
