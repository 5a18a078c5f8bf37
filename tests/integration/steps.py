"""Step handlers used by the integration tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from weft import NonRetryableError, StepContext


def positive(input: dict[str, Any], ctx: StepContext) -> int:
    if input["n"] <= 0:
        raise ValueError(f"n must be positive, got {input['n']}")
    return input["n"]


def refuse(input: Any, ctx: StepContext) -> None:
    raise NonRetryableError("refused")


# ---- dead-letter tests: a step that fails until a flag file exists, and one that refuses bad input


def flaky(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fails until the flag file exists; logs every attempt's idempotency key."""
    with open(input["log"], "a") as f:
        f.write(f"{ctx.idempotency_key} {ctx.attempt}\n")
    if not os.path.exists(input["flag"]):
        raise ConnectionError(f"backend unreachable (no {Path(input['flag']).name})")
    return {"ok": True, "order": input["order"]}


FLAKY = """
name: flaky-orders
steps:
  - id: charge
    type: python
    with: {callable: "tests.integration.steps:flaky"}
    input: {order: "${{ input.order }}", flag: "${{ input.flag }}", log: "${{ input.log }}"}
    retry: {max_attempts: 3, initial_delay: 0.05, max_delay: 0.1}
  - {id: done, type: noop, needs: [charge]}
output: "${{ steps.charge.output }}"
"""

POSITIVE = """
name: needs-positive
steps:
  - id: check
    type: python
    with: {callable: "tests.integration.steps:positive"}
    input: {n: "${{ input.n }}"}
    retry: {max_attempts: 1}
output: "${{ steps.check.output }}"
"""


# ---- lease tests: a slow step that logs each run (who ran it, when it started)


def slow(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    import time

    with open(input["log"], "a") as f:
        f.write(f"{ctx.idempotency_key} {ctx.worker_id} {time.time():.3f}\n")
    time.sleep(input["seconds"])
    return {"slept": input["seconds"], "by": ctx.worker_id}


# ---- secrets (test_step_security.py): a careless step that echoes what it was given


def echo_secret(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"echoed": input, "sentence": f"the token is {input['token']}"}


def fail_with_secret(input: dict[str, Any], ctx: StepContext) -> None:
    token = input["token"]  # a local in the traceback's frame, and in the message
    raise NonRetryableError(f"login refused for token {token!r}")


def big(input: dict[str, Any], ctx: StepContext) -> str:
    """An output of input["size"] bytes (tests of results over the broker's size limit)."""
    return "x" * int(input["size"])


def whoami(input: Any, ctx: Any) -> dict[str, Any]:
    """What a step's context says about the workflow it runs in."""
    return {"workflow": ctx.workflow, "workflow_version": ctx.workflow_version, "step_id": ctx.step_id}
