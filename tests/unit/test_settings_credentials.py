"""Broker credentials in settings: from the environment, or from the stack `weft up` wrote (by role)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.settings import Settings, write_stack


def _stack(home: Path) -> dict[str, Path]:
    files = {}
    for role in ("admin", "worker"):
        files[role] = home / f"{role}.password"
        files[role].write_text(f"pw-{role}\n")
    write_stack(home, {"nats_url": "nats://127.0.0.1:1", "nats_users": {r: str(p) for r, p in files.items()}})
    return files


def test_a_service_takes_its_own_roles_credentials_from_the_stack(tmp_path: Path) -> None:
    files = _stack(tmp_path)
    worker = Settings.load(env={}, home=tmp_path, nats_role="worker")
    assert worker.nats_credentials() == {"user": "worker", "password": "pw-worker"}
    assert worker.nats_password_file == files["worker"]
    # the CLI's own commands (no role) are the operator's: admin
    assert Settings.load(env={}, home=tmp_path).nats_credentials() == {"user": "admin", "password": "pw-admin"}
    # a role the stack has no user for gets none (and the broker will refuse it)
    assert Settings.load(env={}, home=tmp_path, nats_role="gateway").nats_credentials() == {}


def test_the_environment_wins_over_the_stack(tmp_path: Path) -> None:
    _stack(tmp_path)
    env = {"WEFT_NATS_USER": "publisher", "WEFT_NATS_PASSWORD": "from-env"}
    assert Settings.load(env=env, home=tmp_path, nats_role="worker").nats_credentials() == {
        "user": "publisher", "password": "from-env"}
    missing = Settings.load(env={"WEFT_NATS_USER": "x", "WEFT_NATS_PASSWORD_FILE": str(tmp_path / "nope")},
                            home=tmp_path)
    with pytest.raises(ValueError, match="nats_password_file"):
        missing.nats_credentials()
    assert Settings.load(env={}, home=tmp_path / "empty").nats_credentials() == {}  # no stack: no auth


def test_the_stack_file_holds_no_password(tmp_path: Path) -> None:
    _stack(tmp_path)
    assert "pw-" not in (tmp_path / "stack.json").read_text()


@pytest.mark.parametrize("value", ["0", "-5", "86401", "soon"])
def test_webhook_tolerance_is_bounded(value: str) -> None:
    with pytest.raises(ValueError, match="WEFT_WEBHOOK_TOLERANCE"):
        Settings.load(env={"WEFT_WEBHOOK_TOLERANCE": value}, home=Path("/nonexistent-weft-home"))
