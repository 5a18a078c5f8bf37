"""What the benchmarks share: a database to run against, and the services running in this process.
Imported as `common` (a benchmark runs as `python bench/NAME.py`, so its folder is on sys.path).

    url, schema = prepare_db(args.db, workdir)   # 'sqlite', or a PostgreSQL URL (a fresh schema)
    try:
        async with running_services(settings, parts) as stack:
            ...
    finally:
        drop_schema(args.db, schema)

    with services_apart(settings, ["worker", "projector"]):   # the same, each in a process of its own
        ...
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import psycopg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.settings import Settings  # noqa: E402
from services.stack import Stack, run_services  # noqa: E402


def prepare_db(db: str, workdir: Path) -> tuple[str, str | None]:
    """(database URL, PostgreSQL schema to drop afterwards or None): a SQLite file in `workdir` for
    'sqlite', else a fresh schema in the PostgreSQL database `db`."""
    if db == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    return f"{db}?schema={schema}", schema


def drop_schema(db: str, schema: str | None) -> None:
    if schema:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@asynccontextmanager
async def running_services(settings: Settings, parts: Sequence[str], timeout: float = 60) -> AsyncIterator[Stack]:
    """The services `parts` running in this loop until the block ends; fails at once if they cannot start."""
    stop = asyncio.Event()
    ready: asyncio.Future[Stack] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_services(settings, parts, stop, on_ready=ready.set_result))
    try:
        done, _ = await asyncio.wait([ready, task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises why it stopped
        if not ready.done():
            raise RuntimeError(f"the services were not ready after {timeout:.0f}s")
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


@contextmanager
def services_apart(settings: Settings, parts: Sequence[str], cwd: Path = ROOT) -> Iterator[None]:
    """`python -m weft PART` for each of `parts` (one may come more than once), each in a process of
    its own set up like `settings`, until the block ends. `cwd` is where a worker imports step
    callables from."""
    env = {**os.environ, "WEFT_DATABASE_URL": settings.database_url or "", "WEFT_BROKER_URL": settings.broker() or "",
           "WEFT_NAMESPACE": settings.namespace, "WEFT_HOME": str(settings.home),
           "WEFT_WORKER_CONCURRENCY": str(settings.worker_concurrency), "WEFT_LOG_LEVEL": "WARNING",
           "WEFT_STEP_MODULES": settings.step_modules or ""}
    procs = [subprocess.Popen([sys.executable, "-m", "weft", part], env=env, cwd=cwd) for part in parts]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


class Http1:
    """A keep-alive HTTP/1.1 connection that writes a request and reads its answer, nothing more.

    The load generator must cost less than what it measures: httpx spends about 3.7 ms of CPU
    per request here, more than the gateway itself, on a machine with two cores for both.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n{extra}\r\n".encode() + body)
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
