"""Issue 13's stuck relay, measured: an execution input whose StepReady the broker will never take.

Starts relay, orchestrator and worker in this process (SQLite, a NATS server of its own), starts the
big execution straight through the execution service (no entrance check in front), then a small one,
and reports after `--seconds`: bytes logged, relay log lines, tracebacks, the big execution's status,
and when the small one completed. `--code DIR` runs another checkout's services (an older one,
for the "before" figure). Since the payload policy sends a 2 MiB input by reference, give the
server a small max_payload and an input between it and the inline limit to reach the relay's
last line of defence:

    python bench/undeliverable.py --seconds 20 --max-payload 65536 --input-bytes 100000
    python bench/undeliverable.py --seconds 20 --max-payload 65536 --input-bytes 100000 --code /path/to/old
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
import tempfile
import time
from pathlib import Path


async def main(args: argparse.Namespace) -> None:
    from services.broker.nats_server import NatsServer
    from tests.support import up_stack

    class Server(NatsServer):
        def _config(self) -> str:
            extra = f"max_payload: {args.max_payload}\n" if args.max_payload else ""
            return super()._config() + extra

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = Server(tmp / "nats").start()
        try:
            running = await up_stack(tmp, f"sqlite:///{tmp / 'weft.db'}", server.url,
                                     parts=["relay", "orchestrator", "worker"])
            version = running.publish("name: big\nsteps:\n  - {id: a, type: noop}\n")
            started = time.monotonic()
            big = await running.start(version, {"blob": "x" * args.input_bytes})
            small = await running.start(version, {"n": 1})
            small_done = None
            while time.monotonic() - started < args.seconds:
                state = await asyncio.to_thread(running.reader.load, small, fresh=True)
                if state.finished and small_done is None:
                    small_done = round(time.monotonic() - started, 2)
                await asyncio.sleep(0.1)
            big_state = await asyncio.to_thread(running.reader.load, big, fresh=True)
            await asyncio.wait_for(running.close(), 30)
        finally:
            server.stop()
    text = buf.getvalue()
    relay = [line for line in text.splitlines() if " weft.relay " in line]
    print(f"seconds={args.seconds:g} log_bytes={len(text)} relay_lines={len(relay)} "
          f"tracebacks={text.count('Traceback')} big_status={big_state.status} small_completed_after={small_done}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--input-bytes", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--max-payload", type=int, default=0, help="the NATS server's max_payload (0: its default)")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose services to run (default: this one)")
    options = parser.parse_args()
    sys.path.insert(0, str(options.code.resolve()))
    asyncio.run(main(options))
