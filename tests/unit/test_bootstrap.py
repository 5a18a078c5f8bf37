"""A deployment's first admin key (`weft keys bootstrap`) and webhook secrets from files."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.gateway.keys import Keys, KeyProblem
from services.store import open_store
from services.triggers.webhooks import secret_for
from weft.cli import app


def test_bootstrap_records_the_key_of_the_secret_file_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'weft.db'}"
    open_store(url).close()
    key = f"weft_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    (tmp_path / "admin_key").write_text(key + "\n")
    runner = CliRunner()
    env = {"WEFT_DATABASE_URL": url}
    first = runner.invoke(app, ["keys", "bootstrap", "--key-file", str(tmp_path / "admin_key")], env=env)
    assert first.exit_code == 0, first.output
    assert key not in first.output  # it came from the file: not printed
    again = runner.invoke(app, ["keys", "bootstrap", "--key-file", str(tmp_path / "admin_key")], env=env)
    assert again.exit_code == 0 and "nothing to do" in again.output
    store = open_store(url)
    try:
        found = Keys(store).authenticate(key)
        assert found is not None and found.allows("admin") and len(Keys(store).list()) == 1
    finally:
        store.close()


def test_bootstrap_without_a_file_prints_a_new_key_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'weft.db'}"
    open_store(url).close()
    result = CliRunner().invoke(app, ["keys", "bootstrap"], env={"WEFT_DATABASE_URL": url})
    assert result.exit_code == 0
    assert "\nweft_" in result.output and "shown once" in result.output  # stdout and stderr, mixed


def test_a_bad_bootstrap_key_is_refused(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'weft.db'}")
    try:
        with pytest.raises(KeyProblem, match="not a Weft key"):
            Keys(store).create(["admin"], token="hunter2")
    finally:
        store.close()


def test_a_webhook_secret_can_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "orders").write_text("whsec-file\n")
    assert secret_for("ORDERS_SECRET", {"ORDERS_SECRET_FILE": str(tmp_path / "orders")}) == "whsec-file"
    assert secret_for("ORDERS_SECRET", {"ORDERS_SECRET": "env", "ORDERS_SECRET_FILE": "/nope"}) == "env"
    with pytest.raises(KeyError):
        secret_for("ORDERS_SECRET", {"ORDERS_SECRET_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"weft_" + b"a" * 10_000, b"[[[[" * 5000])
def test_a_bootstrap_key_file_that_cannot_be_a_key_is_refused_naming_it(tmp_path: Path, content: bytes) -> None:
    url = f"sqlite:///{tmp_path / 'weft.db'}"
    open_store(url).close()
    (tmp_path / "admin_key").write_bytes(content)
    result = CliRunner().invoke(app, ["keys", "bootstrap", "--key-file", str(tmp_path / "admin_key")],
                                env={"WEFT_DATABASE_URL": url})
    assert result.exit_code == 2 and "admin_key" in result.output, result.output
    store = open_store(url)
    try:
        assert Keys(store).list() == []  # nothing half-stored
    finally:
        store.close()


@pytest.mark.parametrize("content", [b"\xff\xfe", b"x" * (64 * 1024 + 1), b""])
def test_a_webhook_secret_file_that_cannot_be_one_counts_as_not_set(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "orders").write_bytes(content)
    with pytest.raises(KeyError):
        secret_for("ORDERS_SECRET", {"ORDERS_SECRET_FILE": str(tmp_path / "orders")})
