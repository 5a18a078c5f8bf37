"""Contract of the event store (services.store), run against SQLite and PostgreSQL.

`StoreContract` holds the tests; each backend subclass only says where its
store lives (`store_url`).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.store import (
    ConcurrencyError,
    EventStore,
    NewEvent,
    StoreConfigError,
    StoredRecord,
    StoreError,
    StoreUnavailableError,
    open_store,
)

REPO = Path(__file__).resolve().parents[2]


def ev(stream: uuid.UUID, version: int, type_: str = "StepScheduled", data: bytes | None = None) -> NewEvent:
    return NewEvent(stream, version, type_, data if data is not None else b'{"v":%d}' % version)


def run(stream: uuid.UUID, first: int, last: int, type_: str = "StepScheduled") -> list[NewEvent]:
    return [ev(stream, v, type_) for v in range(first, last + 1)]


class StoreContract:
    """The behaviour every EventStore backend must have."""

    @pytest.fixture
    def store_url(self) -> str:
        raise NotImplementedError("backend test classes provide store_url")

    @pytest.fixture
    def store(self, store_url: str) -> Iterator[EventStore]:
        s = open_store(store_url)
        try:
            yield s
        finally:
            s.close()

    # -- append / load ---------------------------------------------------
    def test_append_load_roundtrip_and_ordering(self, store: EventStore) -> None:
        a, b = uuid.uuid4(), uuid.uuid4()
        batch = [ev(a, 1, "ExecutionStarted"), ev(b, 1), ev(a, 2), ev(b, 2), ev(a, 3, data=b"\x00\xff binary")]
        positions = store.append(batch)
        assert len(positions) == 5 and positions == sorted(positions) and len(set(positions)) == 5

        loaded = store.load(a)
        assert [r.version for r in loaded] == [1, 2, 3]
        assert all(isinstance(r, StoredRecord) and r.position == 0 and r.stream_id == a for r in loaded)
        assert loaded[0].type == "ExecutionStarted" and loaded[0].data == b'{"v":1}'
        assert loaded[2].data == b"\x00\xff binary" and isinstance(loaded[2].data, bytes)
        assert [r.version for r in store.load(b)] == [1, 2]

        store.append([ev(a, 4), ev(a, 5)])
        assert [r.version for r in store.load(a, after_version=2)] == [3, 4, 5]
        assert [r.version for r in store.load(a, upto_version=2)] == [1, 2]
        assert [r.version for r in store.load(a, after_version=1, upto_version=4)] == [2, 3, 4]
        assert store.load(uuid.uuid4()) == []

    def test_load_many_loads_whole_histories_in_one_call(self, store: EventStore) -> None:
        a, b, empty = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        store.append([ev(b, 1), ev(a, 1, "ExecutionStarted"), ev(b, 2), ev(a, 2, data=b"\x00 binary")])
        store.append(run(a, 3, 5))
        found = store.load_many([a, empty, b, a])
        assert list(found) == [a, empty, b]  # every id asked for, once, in the order asked
        assert [r.version for r in found[a]] == [1, 2, 3, 4, 5] and [r.version for r in found[b]] == [1, 2]
        assert found[empty] == []
        assert found[a] == store.load(a)  # the same records `load` gives
        assert found[a][1].data == b"\x00 binary" and found[a][0].type == "ExecutionStarted"
        assert store.load_many([]) == {}
        many = [uuid.uuid4() for _ in range(300)]  # more than fit one SQL parameter list on some servers
        store.append([ev(s, 1) for s in many])
        assert all(len(v) == 1 for v in store.load_many(many).values()) and len(store.load_many(many)) == 300

    def test_append_nothing_is_a_no_op(self, store: EventStore) -> None:
        assert store.append([]) == []
        assert store.head() == 0

    def test_positions_match_the_notification_log(self, store: EventStore) -> None:
        streams = [uuid.uuid4() for _ in range(20)]
        batch = [ev(s, v) for v in range(1, 11) for s in streams]  # 200 events, interleaved streams
        positions = store.append(batch)
        log = store.read(0, 1000)
        assert [r.position for r in log] == positions
        assert [(r.stream_id, r.version) for r in log] == [(e.stream_id, e.version) for e in batch]

    def test_version_conflict_raises(self, store: EventStore) -> None:
        a = uuid.uuid4()
        store.append(run(a, 1, 2))
        with pytest.raises(ConcurrencyError) as info:
            store.append([ev(a, 2, "Other")])
        err = info.value
        assert isinstance(err, StoreError) and err.kind == "version" and err.stream_ids == (a,)
        assert err.operation == "append" and err.backend == store.dialect and err.__cause__ is not None
        assert [r.type for r in store.load(a)] == ["StepScheduled", "StepScheduled"]

    def test_duplicate_version_within_one_batch_raises(self, store: EventStore) -> None:
        a = uuid.uuid4()
        with pytest.raises(ConcurrencyError) as info:
            store.append([ev(a, 1), ev(a, 1)])
        assert info.value.kind == "version" and info.value.stream_ids == (a,)
        assert store.load(a) == [] and store.head() == 0

    def test_multi_stream_batch_with_one_conflict_stores_nothing(self, store: EventStore) -> None:
        a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        store.append(run(a, 1, 2), inbox=["m0"], tracking=("orchestrator", 3))
        head = store.head()
        batch = run(b, 1, 50) + run(c, 1, 50) + [ev(a, 2)] + run(b, 51, 60)
        with pytest.raises(ConcurrencyError) as info:
            store.append(batch, inbox=["m1", "m2"], tracking=("orchestrator", 9))
        assert info.value.kind == "version" and info.value.stream_ids == (a,)
        assert store.load(b) == [] and store.load(c) == [] and len(store.load(a)) == 2
        assert store.seen(["m0", "m1", "m2"]) == {"m0"}
        assert store.position("orchestrator") == 3
        assert store.head() == head and store.read(head, 100) == []
        # Once the conflict is fixed, the same batch goes in.
        fixed = [e for e in batch if e.stream_id != a] + [ev(a, 3)]
        positions = store.append(fixed, inbox=["m1", "m2"], tracking=("orchestrator", 9))
        assert len(positions) == len(fixed) and min(positions) > head
        assert store.seen(["m1", "m2"]) == {"m1", "m2"} and store.position("orchestrator") == 9

    # -- inbox -------------------------------------------------------------
    def test_inbox_dedup(self, store: EventStore) -> None:
        a, b = uuid.uuid4(), uuid.uuid4()
        assert store.seen(["r1"]) == set() and store.seen([]) == set()
        store.append([ev(a, 1)], inbox=["r1", "r2"])
        assert store.seen(["r1", "r2", "r3", "r1"]) == {"r1", "r2"}
        with pytest.raises(ConcurrencyError) as info:
            store.append([ev(b, 1)], inbox=["r3", "r2"])
        assert info.value.kind == "inbox" and info.value.message_ids == ("r2",)
        assert store.load(b) == [] and store.seen(["r3"]) == set()

    def test_inbox_duplicate_within_one_call_and_inbox_only_appends(self, store: EventStore) -> None:
        with pytest.raises(ConcurrencyError) as info:
            store.append([ev(uuid.uuid4(), 1)], inbox=["x", "x"])
        assert info.value.kind == "inbox" and store.head() == 0 and store.seen(["x"]) == set()
        # A consumed message that produced no events is still recorded.
        assert store.append([], inbox=["y"], tracking=("orchestrator", 1)) == []
        assert store.seen(["y"]) == {"y"} and store.position("orchestrator") == 1

    def test_inbox_conflict_with_tracking_stores_nothing(self, store: EventStore) -> None:
        store.append([ev(uuid.uuid4(), 1)], inbox=["dup"], tracking=("orchestrator", 1))
        b = uuid.uuid4()
        with pytest.raises(ConcurrencyError) as info:
            store.append([ev(b, 1)], inbox=["dup"], tracking=("orchestrator", 2))
        assert info.value.kind == "inbox"
        assert store.load(b) == [] and store.position("orchestrator") == 1

    def test_stale_tracking_in_append_stores_nothing(self, store: EventStore) -> None:
        store.append([ev(uuid.uuid4(), 1)], tracking=("orchestrator", 5))
        b = uuid.uuid4()
        with pytest.raises(ConcurrencyError) as info:
            store.append([ev(b, 1)], inbox=["late"], tracking=("orchestrator", 5))
        assert info.value.kind == "tracking" and info.value.tracking == ("orchestrator", 5)
        assert store.load(b) == [] and store.seen(["late"]) == set()

    # -- notification log --------------------------------------------------
    def test_read_ordering_limit_types_and_after(self, store: EventStore) -> None:
        assert store.read(0, 10) == []
        a, b = uuid.uuid4(), uuid.uuid4()
        p1 = store.append([ev(a, 1, "ExecutionStarted"), ev(a, 2, "StepScheduled")])
        p2 = store.append([ev(b, 1, "ExecutionStarted"), ev(a, 3, "StepSucceeded"), ev(b, 2, "StepScheduled")])
        everything = store.read(0, 100)
        assert [r.position for r in everything] == p1 + p2
        assert [(r.stream_id, r.version, r.type) for r in everything] == [
            (a, 1, "ExecutionStarted"), (a, 2, "StepScheduled"), (b, 1, "ExecutionStarted"),
            (a, 3, "StepSucceeded"), (b, 2, "StepScheduled"),
        ]
        assert store.read(0, 2) == everything[:2]
        assert store.read(everything[1].position, 2) == everything[2:4]
        assert store.read(everything[-1].position, 10) == []
        assert store.read(0, 0) == []
        scheduled = store.read(0, 100, types=["StepScheduled"])
        assert [(r.stream_id, r.version) for r in scheduled] == [(a, 2), (b, 2)]
        assert store.read(scheduled[0].position, 100, ("StepScheduled", "StepSucceeded")) == everything[3:]
        assert store.read(0, 1, types=["ExecutionStarted"]) == everything[:1]
        assert store.read(0, 10, types=["Nope"]) == []

    def test_head(self, store: EventStore) -> None:
        assert store.head() == 0
        positions = store.append(run(uuid.uuid4(), 1, 3))
        assert store.head() == positions[-1]
        more = store.append(run(uuid.uuid4(), 1, 2))
        assert store.head() == more[-1] > positions[-1]

    def test_follow_moves_past_other_types(self, store: EventStore) -> None:
        assert store.follow(0, 10, ["StepScheduled"]) == ([], 0)
        a = uuid.uuid4()
        p = store.append([ev(a, 1, "ExecutionStarted"), ev(a, 2, "StepScheduled"), ev(a, 3, "StepSucceeded")])
        records, after = store.follow(0, 10, ["StepScheduled"])
        assert [r.position for r in records] == [p[1]] and after == p[2]  # past the StepSucceeded too
        noise = store.append([ev(uuid.uuid4(), 1, "DeadLetterRecorded") for _ in range(5)])
        assert store.follow(after, 10, ["StepScheduled"]) == ([], noise[-1])
        assert store.follow(noise[-1], 10, ["StepScheduled"]) == ([], noise[-1])
        # A full batch: the next read starts after its last record, not at the head.
        more = store.append([ev(a, 4, "StepScheduled"), ev(a, 5, "StepScheduled"), ev(a, 6, "StepSucceeded")])
        records, after = store.follow(noise[-1], 2, ["StepScheduled"])
        assert [r.position for r in records] == more[:2] and after == more[1]
        assert store.follow(after, 2, ["StepScheduled"]) == ([], more[2])

    def test_view_transaction_reads_the_log(self, store: EventStore) -> None:
        with store.transaction() as tx:
            assert tx.read_log(0, 10) == [] and tx.head() == 0
        a, b = uuid.uuid4(), uuid.uuid4()
        store.append([ev(a, 1, "ExecutionStarted"), ev(b, 1), ev(a, 2, data=b"\x00\xff binary")])
        store.append([ev(b, 2, "StepSucceeded")])
        # the same log as `read`, as tuples: (position, stream id text, version, type, data)
        expected = [(r.position, str(r.stream_id), r.version, r.type, r.data) for r in store.read(0, 100)]
        for begin in (store.transaction, store.reader):
            with begin() as tx:
                rows = tx.read_log(0, 100)
                assert rows == expected
                assert [tuple(type(x) for x in row) for row in rows] == [(int, str, int, str, bytes)] * 4
                assert tx.read_log(0, 2) == expected[:2]
                assert tx.read_log(expected[1][0], 10) == expected[2:]
                assert tx.read_log(expected[-1][0], 10) == [] and tx.read_log(0, 0) == []
                assert tx.head() == store.head() == expected[-1][0]
        # read, write what was made of it and track it, in one transaction
        with store.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS view_log (position BIGINT PRIMARY KEY)")
            tx.executemany("INSERT INTO view_log VALUES (?)", [(row[0],) for row in tx.read_log(0, 100)])
            tx.track("projection.log", tx.head())
        with store.transaction() as tx:
            tx.execute("SELECT position FROM view_log ORDER BY position")
            assert tx.fetchall() == [(row[0],) for row in expected]
        assert store.position("projection.log") == expected[-1][0]

    def test_prune_inbox_forgets_only_old_ids(self, store: EventStore) -> None:
        store.append([], inbox=[f"old-{i}" for i in range(25)])
        store.append([], inbox=["new-1", "new-2"])
        old = "2000-01-01T00:00:00.000Z"  # text form of the SQLite column; PostgreSQL parses it
        with store.transaction() as tx:
            tx.execute("UPDATE inbox SET recorded_at = ? WHERE message_id LIKE 'old-%'", (old,))
        assert store.prune_inbox(3600, batch=10) == 25  # three transactions of at most 10
        assert store.seen([f"old-{i}" for i in range(25)] + ["new-1", "new-2"]) == {"new-1", "new-2"}
        assert store.prune_inbox(3600) == 0
        store.append([], inbox=["old-3"])  # forgotten: the id may be recorded again
        assert store.seen(["old-3"]) == {"old-3"}

    def test_view_transaction_reads_one_stream(self, store: EventStore) -> None:
        a, b = uuid.uuid4(), uuid.uuid4()
        store.append([ev(a, 1, "ExecutionStarted"), ev(b, 1), ev(a, 2, data=b"\x00\xff binary")])
        store.append([ev(a, 3, "StepSucceeded"), ev(b, 2)])
        mine = [(r.position, str(r.stream_id), r.version, r.type, r.data) for r in store.read(0, 100) if r.stream_id == a]
        for begin in (store.transaction, store.reader):
            with begin() as tx:
                assert tx.read_stream(str(a)) == mine
                assert tx.read_stream(str(a), upto_version=2) == mine[:2]
                assert tx.read_stream(str(a), upto_version=0) == []
                assert tx.read_stream(str(uuid.uuid4())) == []
        with store.transaction() as tx:  # sees its own transaction's state: nothing half-read
            assert [row[2] for row in tx.read_stream(str(b))] == [1, 2]

    # -- tracking ------------------------------------------------------------
    def test_position_and_track_are_monotonic(self, store: EventStore) -> None:
        assert store.position("relay") == 0
        store.track("relay", 5)
        assert store.position("relay") == 5
        for stale in (3, 5):
            with pytest.raises(ConcurrencyError) as info:
                store.track("relay", stale)
            assert info.value.kind == "tracking" and info.value.tracking == ("relay", stale)
        assert store.position("relay") == 5
        store.track("relay", 9)
        store.track("projection.executions", 2)
        assert store.position("relay") == 9 and store.position("projection.executions") == 2

    # -- view transactions --------------------------------------------------
    def test_transaction_writes_view_rows_and_tracking_atomically(self, store: EventStore) -> None:
        with store.transaction() as tx:
            assert tx.dialect == store.dialect
            tx.execute("CREATE TABLE IF NOT EXISTS view_status (execution_id TEXT PRIMARY KEY, status TEXT, n INTEGER)")
        with store.transaction() as tx:
            tx.executemany("INSERT INTO view_status VALUES (?, ?, ?)", [("e1", "running", 1), ("e2", "done", 2)])
            tx.execute("UPDATE view_status SET n = n + ? WHERE status LIKE '%run%'", (10,))
            tx.track("projection.status", 7)
        with store.transaction() as tx:
            tx.execute("SELECT execution_id, status, n FROM view_status ORDER BY execution_id")
            assert tx.fetchall() == [("e1", "running", 11), ("e2", "done", 2)]
            tx.execute("SELECT status FROM view_status WHERE execution_id = ?", ["e3"])
            assert tx.fetchone() is None
            tx.execute("SELECT '?', status FROM view_status WHERE execution_id = ?", ["e1"])
            assert tx.fetchone() == ("?", "running")
        assert store.position("projection.status") == 7

    def test_transaction_rolls_back_rows_and_tracking_on_exception(self, store: EventStore) -> None:
        with store.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS view_rows (k TEXT PRIMARY KEY)")
            tx.execute("INSERT INTO view_rows VALUES (?)", ("kept",))
            tx.track("projection.rows", 1)

        class Boom(Exception):
            pass

        with pytest.raises(Boom), store.transaction() as tx:
            tx.execute("INSERT INTO view_rows VALUES (?)", ("lost",))
            tx.track("projection.rows", 2)
            raise Boom
        # A stale tracking record aborts the transaction too: it means "applied twice".
        with pytest.raises(ConcurrencyError), store.transaction() as tx:
            tx.execute("INSERT INTO view_rows VALUES (?)", ("also lost",))
            tx.track("projection.rows", 1)
        # A failing statement surfaces as a StoreError, with the cause kept.
        with pytest.raises(StoreError) as info, store.transaction() as tx:
            tx.execute("INSERT INTO view_rows VALUES (?)", ("kept",))
        assert info.value.__cause__ is not None
        with store.transaction() as tx:
            tx.execute("SELECT k FROM view_rows ORDER BY k")
            assert tx.fetchall() == [("kept",)]
        assert store.position("projection.rows") == 1

    # -- concurrency -----------------------------------------------------------
    def test_threads_racing_for_the_same_version_exactly_one_wins(self, store: EventStore) -> None:
        a = uuid.uuid4()
        n = 8
        barrier = threading.Barrier(n)
        outcomes: list[str] = []
        lock = threading.Lock()

        def contender(i: int) -> None:
            barrier.wait()
            try:
                store.append([ev(a, 1, f"Writer{i}"), ev(uuid.uuid4(), 1)], inbox=[f"msg-{i}"])
                result = f"won:{i}"
            except ConcurrencyError:
                result = "lost"
            with lock:
                outcomes.append(result)

        threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(outcomes) == n and len(winners) == 1
        winner = int(winners[0].split(":")[1])
        assert [r.type for r in store.load(a)] == [f"Writer{winner}"]
        assert store.seen([f"msg-{i}" for i in range(n)]) == {f"msg-{winner}"}
        assert len(store.read(0, 100)) == 2

    async def test_concurrent_appends_from_asyncio_to_thread(self, store: EventStore) -> None:
        streams = [uuid.uuid4() for _ in range(16)]
        results = await asyncio.gather(*(asyncio.to_thread(store.append, run(s, 1, 25)) for s in streams))
        positions = [p for r in results for p in r]
        assert len(set(positions)) == 16 * 25
        log = store.read(0, 1000)
        assert [r.position for r in log] == sorted(positions)
        for r in results:  # each batch's events are contiguous in commit order
            assert r == sorted(r)

    def test_processes_share_the_store(self, store: EventStore, store_url: str) -> None:
        code = (
            "import sys, uuid\n"
            "from services.store import open_store, NewEvent\n"
            "s = open_store(sys.argv[1])\n"
            "for _ in range(10):\n"
            "    sid = uuid.uuid4()\n"
            "    s.append([NewEvent(sid, v, 'E', b'{}') for v in range(1, 21)])\n"
            "s.close()\n"
        )
        procs = [subprocess.Popen([sys.executable, "-c", code, store_url], cwd=REPO) for _ in range(3)]
        for _ in range(10):
            store.append(run(uuid.uuid4(), 1, 20))
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
        log = store.read(0, 10_000)
        assert len(log) == 4 * 10 * 20
        assert [r.position for r in log] == sorted({r.position for r in log})

    def test_processes_opening_a_fresh_store_at_once(self, store_url: str) -> None:
        code = (
            "import sys, uuid\n"
            "from services.store import open_store, NewEvent\n"
            "s = open_store(sys.argv[1])\n"
            "s.append([NewEvent(uuid.uuid4(), 1, 'E', b'{}')])\n"
            "s.close()\n"
        )
        procs = [subprocess.Popen([sys.executable, "-c", code, store_url], cwd=REPO) for _ in range(4)]
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
        s = open_store(store_url)
        try:
            assert len(s.read(0, 10)) == 4
        finally:
            s.close()

    # -- lifecycle ---------------------------------------------------------------
    def test_reopen_sees_everything(self, store_url: str) -> None:
        a = uuid.uuid4()
        first = open_store(store_url)
        try:
            positions = first.append(run(a, 1, 3), inbox=["m1"], tracking=("orchestrator", 4))
            first.track("relay", 2)
            with first.transaction() as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS view_kv (k TEXT PRIMARY KEY, v TEXT)")
                tx.execute("INSERT INTO view_kv VALUES (?, ?)", ("a", "1"))
                tx.track("projection.kv", positions[-1])
        finally:
            first.close()
        with pytest.raises(StoreError):
            first.head()

        second = open_store(store_url)
        try:
            assert [r.version for r in second.load(a)] == [1, 2, 3]
            assert [r.position for r in second.read(0, 10)] == positions
            assert second.head() == positions[-1]
            assert second.seen(["m1"]) == {"m1"}
            assert second.position("orchestrator") == 4 and second.position("relay") == 2
            assert second.position("projection.kv") == positions[-1]
            with second.transaction() as tx:
                tx.execute("SELECT v FROM view_kv WHERE k = ?", ("a",))
                assert tx.fetchone() == ("1",)
            assert second.append([ev(a, 4)])[0] > positions[-1]
            with pytest.raises(ConcurrencyError):
                second.append([ev(a, 3)])
        finally:
            second.close()

    def test_error_types_are_store_errors(self) -> None:
        assert issubclass(ConcurrencyError, StoreError) and issubclass(StoreUnavailableError, StoreError)
        with pytest.raises(StoreConfigError):
            open_store("mysql://nope/db")
        with pytest.raises(StoreConfigError):
            open_store("sqlite:///x.db", pool_size=0)


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store_url(self, sqlite_url: str) -> str:
        return sqlite_url

    def test_url_forms_and_durability_pragmas(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        rel = open_store("sqlite:///data/rel.db")  # relative to the working directory; dirs created
        try:
            assert (tmp_path / "data" / "rel.db").exists() and rel.dialect == "sqlite"
            with rel.transaction() as tx:
                tx.execute("PRAGMA journal_mode")
                assert tx.fetchone() == ("wal",)
                tx.execute("PRAGMA synchronous")
                assert tx.fetchone() == (2,)  # FULL
                tx.execute("PRAGMA busy_timeout")
                assert tx.fetchone()[0] >= 5000
        finally:
            rel.close()
        mem = open_store("sqlite:///:memory:")
        try:
            assert mem.append(run(uuid.uuid4(), 1, 3)) == [1, 2, 3]
        finally:
            mem.close()

    def test_positions_are_dense(self, store: EventStore) -> None:
        a = uuid.uuid4()
        assert store.append(run(a, 1, 3)) == [1, 2, 3]
        with pytest.raises(ConcurrencyError):
            store.append([ev(uuid.uuid4(), 1), ev(a, 3)])
        assert store.append([ev(a, 4)]) == [4]


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store_url(self, pg_url: str) -> str:
        return pg_url

    def test_schema_is_created_and_holds_the_view_tables(self, pg_url: str) -> None:
        schema = pg_url.split("schema=")[1]
        s = open_store(pg_url, pool_size=2)
        try:
            assert s.dialect == "postgresql" and s.url == pg_url
            s.append([ev(uuid.uuid4(), 1)])
            with s.transaction() as tx:
                tx.execute("CREATE TABLE view_here (k TEXT)")  # unqualified: the store's schema
                tx.execute("SELECT current_schema(), count(*) FROM stored_events")
                assert tx.fetchone() == (schema, 1)
                tx.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY 1", (schema,))
                assert tx.fetchall() == [("blobs",), ("inbox",), ("notification_tracking",), ("stored_events",),
                                         ("view_here",)]
        finally:
            s.close()

    def test_unreachable_server_is_unavailable(self) -> None:
        with pytest.raises(StoreUnavailableError) as info:
            open_store("postgresql://postgres@127.0.0.1:1/test?schema=nope")
        assert info.value.transient and info.value.backend == "postgresql"

    def test_bad_url_parameters(self, pg_server_url: str) -> None:
        with pytest.raises(StoreConfigError):
            open_store(f"{pg_server_url}?schema=bad-name;drop")
        with pytest.raises(StoreConfigError):
            open_store(f"{pg_server_url}?sslmode=require")


def test_every_store_method_a_service_calls_is_on_the_port() -> None:
    """Port drift: a method services call on a store but the EventStore Protocol (and so this
    suite) does not name is a method a new backend would not know it must have."""
    import ast

    port = {n for n in dir(EventStore) if not n.startswith("_")} | {"url", "dialect"}
    used: dict[str, set[str]] = {}
    for base in ("services", "weft"):
        for path in (REPO / base).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("services/store/"):
                continue  # the adapters themselves
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if not isinstance(node, ast.Attribute):
                    continue
                target = node.value
                name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
                if name == "store" and not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                            and target.value.id == "services"):
                    used.setdefault(node.attr, set()).add(rel)
    missing = {m: sorted(where) for m, where in used.items() if m not in port}
    assert not missing, f"store methods used but not on the EventStore Protocol: {missing}"
