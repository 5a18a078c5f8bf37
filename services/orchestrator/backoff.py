"""Retry backoff: a pure function of the policy, the attempt and a seed.

Jitter must not come from a random number generator (decide() is replayed and
must give the same events), so it is derived from a hash of the task's
idempotency key and the attempt: spread across tasks, stable for one task.
"""

from __future__ import annotations

import hashlib

from contracts.definitions import RetryPolicy


def unit_jitter(seed: str) -> float:
    """A stable number in [0, 1) from a seed."""
    digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def backoff(policy: RetryPolicy, failures: int, seed: str, requested: float | None = None) -> float:
    """Seconds to wait before the next attempt, after `failures` failed attempts (>= 1).

    Exponential: initial_delay * multiplier ** (failures - 1), capped at max_delay.
    With jitter ("equal jitter"), the wait is in [delay / 2, delay): never zero,
    never more than the cap. A delay the handler asked for wins, still capped.
    """
    if requested is not None:
        return max(0.0, min(requested, policy.max_delay))
    exponent = max(failures - 1, 0)
    # Cap the exponent first so a large attempt count cannot overflow a float.
    delay = policy.initial_delay * policy.multiplier ** min(exponent, 64)
    delay = min(delay, policy.max_delay)
    if policy.jitter and delay > 0:
        delay = delay / 2 + unit_jitter(f"{seed}:{failures}") * delay / 2
    return delay
