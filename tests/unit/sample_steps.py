"""Callables for the `python` step-type tests (tests/unit/test_step_types.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from weft import NonRetryableError, StepContext



def double(input: Any, ctx: StepContext) -> Any:
    return {"doubled": input["n"] * 2, "thread": threading.get_ident()}


async def async_double(input: Any, ctx: StepContext) -> Any:
    await asyncio.sleep(0)
    return {"doubled": input["n"] * 2, "thread": threading.get_ident()}


def context(input: Any, ctx: StepContext) -> Any:
    return {
        "execution_id": ctx.execution_id,
        "step_id": ctx.step_id,
        "attempt": ctx.attempt,
        "idempotency_key": ctx.idempotency_key,
        "item": ctx.item,
    }


def returns_set(input: Any, ctx: StepContext) -> Any:
    return {"ids": {1, 2, 3}}


def returns_object(input: Any, ctx: StepContext) -> Any:
    return object()


def returns_tuple(input: Any, ctx: StepContext) -> Any:
    return (1, "two", None)


def refuses(input: Any, ctx: StepContext) -> Any:
    raise NonRetryableError("card declined")


async def async_fails(input: Any, ctx: StepContext) -> Any:
    raise ValueError("boom")


class Greeter:
    @staticmethod
    def greet(input: Any, ctx: StepContext) -> Any:
        return f"hello {input}"


class AsyncCallable:
    async def __call__(self, input: Any, ctx: StepContext) -> Any:
        return {"async_object": True}


async_object = AsyncCallable()

NOT_CALLABLE = 42
