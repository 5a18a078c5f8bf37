"""Crash points for fault-injection tests: SIGKILL this process at a named line.

`WEFT_CRASH_AT=relay.after_publish:3` kills the process with SIGKILL the third
time it reaches `crash_point("relay.after_publish")`. A point can also be
reached with a key (an execution id, say): `WEFT_CRASH_AT=worker.handle@<key>`
kills the process the first time it reaches `crash_point("worker.handle", key)`
with that key, which is how tests make one chosen message kill every process
that handles it (a poison message). Without the variable a crash point costs
one string comparison. Tests use it to prove that a kill at the worst moment
(between a store commit and a broker ack, say) loses nothing and applies
nothing twice.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("WEFT_CRASH_AT", "")
_point, _, _count = _spec.rpartition(":") if _spec.rpartition(":")[2].isdigit() else (_spec, "", "")
_name, _, _key = _point.partition("@")
_hits: dict[str, int] = {}


def crash_point(name: str, key: str | None = None) -> None:
    if not _spec or name != _name or (_key and key != _key):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(_count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
