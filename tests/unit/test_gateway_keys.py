"""API keys: stored hashed with a prefix in clear, scopes, binding, revocation (over a SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.keys import Keys, KeyProblem, key_stream, parse_scopes
from services.store import open_store


@pytest.fixture
def keys(tmp_path: Path):
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    yield Keys(store, cache_ttl=0)
    store.close()


def test_key_is_stored_hashed_and_authenticates(keys: Keys) -> None:
    token, key = keys.create(["read,trigger"], name="ci")
    assert token.startswith(f"weft_{key.key_id}_") and len(token) == 5 + 8 + 1 + 43
    stored = b"".join(r.data for r in keys.store.load(key_stream(key.key_id)))
    assert token.encode() not in stored and token.split("_", 2)[2].encode() not in stored
    assert key.key_id.encode() in stored and b"sha256:" in stored
    found = keys.authenticate(token)
    assert found is not None and found.scopes == {"read", "trigger"} and found.name == "ci"
    assert keys.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None  # same prefix, wrong secret
    assert keys.authenticate("weft_00000000_" + "x" * 43) is None
    assert keys.authenticate("garbage") is None


def test_scopes_imply_and_bind(keys: Keys) -> None:
    _, admin = keys.create(["admin"])
    assert admin.allows("read") and admin.allows("trigger") and admin.allows("admin")
    _, reader = keys.create(["read"], workflows=["a", "b"])
    assert reader.allows("read") and not reader.allows("trigger") and not reader.allows("admin")
    assert reader.can_use("a") and not reader.can_use("c")
    assert admin.can_use("anything")


def test_revocation_and_listing(keys: Keys) -> None:
    token, key = keys.create(["admin"])
    other, _ = keys.create(["read"])
    keys.revoke(f"weft_{key.key_id}")
    assert keys.authenticate(token) is None
    assert keys.authenticate(other) is not None
    listed = {k.key_id: k for k in keys.list()}
    assert listed[key.key_id].revoked_at is not None and len(listed) == 2
    assert keys.revoke(key.key_id).revoked_at == listed[key.key_id].revoked_at  # idempotent
    with pytest.raises(KeyProblem):
        keys.revoke("deadbeef")


@pytest.mark.parametrize("bad", [[], ["root"], ["read,superuser"]])
def test_bad_scopes(bad: list[str]) -> None:
    with pytest.raises(KeyProblem, match="scopes"):
        parse_scopes(bad)


def test_bad_workflow_binding(keys: Keys) -> None:
    with pytest.raises(KeyProblem, match="workflows"):
        keys.create(["read"], workflows=["not a name!"])
