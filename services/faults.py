"""Crash points for fault-injection tests: SIGKILL this process at a named line.

`WEFT_CRASH_AT=relay.after_publish:3` kills the process with SIGKILL the third
time it reaches `crash_point("relay.after_publish")`. Without the variable a
crash point costs one dict lookup. Tests use it to prove that a kill at the
worst moment (between a store commit and a broker ack, say) loses nothing and
applies nothing twice.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("WEFT_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    if not _spec or name != _name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(_count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
