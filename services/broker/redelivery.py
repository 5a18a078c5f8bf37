"""Telling a message that kills its consumer from one that is merely redelivered.

If handling a message kills the process (out of memory, a segfault in a C
extension), nothing in the process survives to say so: the message is simply
delivered again, to the restarted process, which dies again. The broker's
delivery count is the only witness. `CrashGuard` turns it into a decision:

- A delivery this process saw end without dying (a nak for a retry's backoff,
  a batch that failed because the store was away) is not a crash; the guard
  remembers those (`survived`) and does not count them.
- Past `limit` unexplained deliveries the message is poison: the consumer does
  not handle it again but fails its task and dead-letters it (`poisoned`).
- A crash kills every message the process held, not only the guilty one. So a
  redelivered message (a suspect) is handled alone, with nothing else in
  flight, and for a while after seeing one, or after starting with messages
  left unacked by an earlier process, the consumer fetches one message at a
  time (`careful`): an innocent message is then never in the room twice when
  the guilty one brings the process down, and only the guilty one's count grows.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from services.broker.ports import Delivery

# The worker naks a StepReady whose retry backoff is not over, with that delay; the redelivery
# counts as one more delivery, and a worker whose clock is behind the others' may nak once more.
TIMER_ALLOWANCE = 2


def poison_reason(delivered: int, who: str) -> str:
    return f"delivered {delivered} times without being acknowledged: it crashed or stalled its {who}"


class CrashGuard:
    """One per consumer. `limit` 0 turns the guard off (nothing is ever poison)."""

    REMEMBERED = 10_000  # deliveries that ended without a crash, by stream sequence

    def __init__(self, limit: int, *, careful_for: float, unacked_at_start: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit, self.careful_for, self.clock = limit, careful_for, clock
        self._survived: OrderedDict[int, int] = OrderedDict()
        # Messages left unacked by an earlier process come back within ack_wait: be careful till then.
        self._careful_until = clock() + careful_for if unacked_at_start else 0.0

    def survived(self, msg: Delivery) -> None:
        """This delivery of `msg` ended, in this process, without it being acked (a nak, a failed batch)."""
        seq = msg.stream_seq
        self._survived[seq] = self._survived.pop(seq, 0) + 1
        while len(self._survived) > self.REMEMBERED:
            self._survived.popitem(last=False)

    def done(self, msg: Delivery) -> None:
        """`msg` was acked: forget it."""
        self._survived.pop(msg.stream_seq, None)

    def unexplained(self, msg: Delivery, allowance: int = 0) -> int:
        """Deliveries of `msg` before this one that may have ended with the process dying."""
        return max(0, msg.delivered - 1 - self._survived.get(msg.stream_seq, 0) - allowance)

    def poisoned(self, msg: Delivery, allowance: int = 0) -> bool:
        return self.limit > 0 and self.unexplained(msg, allowance) >= self.limit

    def suspect(self, msg: Delivery, allowance: int = 0) -> bool:
        """Delivered before, and this process did not see that delivery end: handle it alone."""
        if self.limit and self.unexplained(msg, allowance) > 0:
            self._careful_until = self.clock() + self.careful_for
            return True
        return False

    @property
    def careful(self) -> bool:
        """Fetch one message at a time."""
        return self.limit > 0 and self.clock() < self._careful_until
