"""Contract of the blob store (services.store.blobs), run against SQLite and PostgreSQL.

`BlobContract` holds the tests; each backend subclass only says where its store lives.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator

import pytest

from services.store import EventStore, open_store
from services.store.blobs import BlobNotFound, BlobStore, SqlBlobStore


class BlobContract:
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

    @pytest.fixture
    def blobs(self, store: EventStore) -> BlobStore:
        return SqlBlobStore(store)

    def test_put_returns_the_sha256_and_get_gives_the_bytes_back(self, blobs: BlobStore) -> None:
        data = os.urandom(300_000) + b"\x00\xff end"
        digest = blobs.put(data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert blobs.get(digest) == data and isinstance(blobs.get(digest), bytes)
        assert blobs.size(digest) == len(data)
        assert blobs.put(b"") == hashlib.sha256(b"").hexdigest() and blobs.get(hashlib.sha256(b"").hexdigest()) == b""

    def test_the_same_bytes_are_stored_once(self, blobs: BlobStore, store: EventStore) -> None:
        data = b"x" * 100_000
        assert blobs.put(data) == blobs.put(data) == blobs.put(bytes(data))
        with store.reader() as tx:
            tx.execute("SELECT COUNT(*) FROM blobs")
            assert tx.fetchone() == (1,)

    def test_unknown_digest_is_blob_not_found(self, blobs: BlobStore) -> None:
        missing = "0" * 64
        with pytest.raises(BlobNotFound) as caught:
            blobs.get(missing)
        assert missing in str(caught.value) and getattr(caught.value, "non_retryable", False)
        assert blobs.size(missing) is None

    def test_has_tells_which_are_stored(self, blobs: BlobStore) -> None:
        a, b = blobs.put(b"a" * 10), blobs.put(b"b" * 10)
        assert blobs.has([a, "f" * 64, b, a]) == {a, b}
        assert blobs.has([]) == set()
        many = [blobs.put(str(i).encode()) for i in range(600)]  # more than one IN (...) chunk
        assert blobs.has(many) == set(many)

    def test_concurrent_puts_of_the_same_bytes(self, blobs: BlobStore) -> None:
        data = os.urandom(200_000)
        errors: list[BaseException] = []

        def put() -> None:
            try:
                blobs.put(data)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=put) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert blobs.get(hashlib.sha256(data).hexdigest()) == data

    def test_a_large_blob_survives_reopening(self, store_url: str) -> None:
        data = os.urandom(1024 * 1024) * 20  # 20 MiB
        first = open_store(store_url)
        try:
            digest = SqlBlobStore(first).put(data)
        finally:
            first.close()
        again = open_store(store_url)
        try:
            assert SqlBlobStore(again).get(digest) == data
        finally:
            again.close()


class TestSQLiteBlobs(BlobContract):
    @pytest.fixture
    def store_url(self, sqlite_url: str) -> str:
        return sqlite_url


class TestPostgresBlobs(BlobContract):
    @pytest.fixture
    def store_url(self, pg_url: str) -> str:
        return pg_url
