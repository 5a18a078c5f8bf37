"""Kill the projector (SIGKILL) in the middle of a batch: no view row is lost or doubled.

`python -m weft projector` runs as a real subprocess with small batches and the
crash point `projector.mid_batch` (rows of the batch written to the open
transaction, nothing tracked or committed). After the kill each view holds
exactly the rows of the events up to its tracked position; after a restart
it equals a view built cold from the same history.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.orchestrator.executions import Executions
from services.projections import Projector, default_views, projection_status
from services.projections.timeline import EXECUTION_EVENTS
from services.store import open_store
from tests.golden.drive import seed_mix
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _projector(tmp_path: Path, db_url: str, nats_url: str, **extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "WEFT_CRASH_AT"}
    env.update({"WEFT_HOME": str(tmp_path), "WEFT_DATABASE_URL": db_url, "WEFT_NATS_URL": nats_url,
                "WEFT_NAMESPACE": f"p{uuid.uuid4().hex[:8]}", "WEFT_PROJECTION_BATCH": "40",
                "WEFT_POLL_INTERVAL": "0.02", "PYTHONPATH": str(ROOT), **extra})
    log = open(tmp_path / f"projector-{uuid.uuid4().hex[:6]}.log", "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "weft", "projector"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        log.close()


async def test_sigkill_mid_batch_neither_loses_nor_doubles_a_row(tmp_path: Path, db_url: str, nats_url: str) -> None:
    store = open_store(db_url)
    try:
        seed_mix(Executions(store), 27)
        head = store.head()
        proc = _projector(tmp_path, db_url, nats_url, WEFT_CRASH_AT="projector.mid_batch:4")
        await wait_until(lambda: proc.poll() is not None, timeout=60, what="the crash point")
        assert proc.returncode == -signal.SIGKILL

        # Killed with the 4th batch's rows written but not committed: every view is
        # exactly at a batch boundary, with the rows of the events up to there. (On
        # PostgreSQL views commit in parallel lanes: one may be a batch ahead.)
        status = {r["id"]: r for r in projection_status(store, default_views())}
        assert all(0 < r["position"] < head for r in status.values()), status
        position = status["view:timeline"]["position"]
        with store.transaction() as tx:
            tx.execute("SELECT COUNT(*), MAX(position) FROM weft_timeline")
            rows, last = tx.fetchone()
        events = [r for r in store.read(0, 1_000_000, list(EXECUTION_EVENTS)) if r.position <= position]
        assert rows == len(events) and last == events[-1].position

        proc = _projector(tmp_path, db_url, nats_url)
        try:
            await wait_until(lambda: all(r["lag"] == 0 for r in projection_status(store, default_views())),
                             timeout=60, what="the restarted projector to catch up")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        twin = default_views("cold_")
        Projector(store, twin).catch_up()
        with store.transaction() as tx:
            for live, cold in zip(default_views(), twin):
                for logical, spec in live.tables.items():
                    order = ", ".join(spec.key)
                    tx.execute(f"SELECT * FROM {live.t[logical]} ORDER BY {order}")
                    got = tx.fetchall()
                    tx.execute(f"SELECT * FROM {cold.t[logical]} ORDER BY {order}")
                    assert got == tx.fetchall(), f"{logical} differs from a cold build after the crash"
            tx.execute("SELECT COUNT(*) FROM weft_timeline")
            assert tx.fetchone()[0] == len(store.read(0, 1_000_000, list(EXECUTION_EVENTS)))
    finally:
        store.close()
