"""Code-first workflows compile to the definition YAML gives: same model, same content hash."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from contracts.definitions import DefinitionError, parse_definition
from services.worker.steps import PythonStep, StepModules
from weft import StepContext, Workflow
from weft.workflow import StepInputInvalid, StepOutputInvalid, input_, item, load, output_of

YAML = """
name: order-fulfilment
on:
  - event: order.created
input_schema:
  type: object
  required: [order_id]
  properties:
    order_id: {type: string}
    items: {type: array, items: {type: string}}
steps:
  - id: reserve
    type: python
    with: {callable: "tests.unit.test_sdk_workflow:reserve"}
    input: {order: "${{ input.order_id }}", items: "${{ input.items }}"}
    retry: {max_attempts: 3, initial_delay: 0.1}
    timeout: 30
  - id: ship_each
    type: python
    needs: [reserve]
    map: "${{ steps.reserve.output.items }}"
    with: {callable: "tests.unit.test_sdk_workflow:ship_each"}
    retry: {max_attempts: 3, initial_delay: 0.2, max_delay: 2}
  - id: summary
    type: transform
    needs: [ship_each]
    when: "${{ steps.reserve.output.ok }}"
    with: {expression: "{parcels: shipped[].parcel, count: length(shipped)}"}
    input: {shipped: "${{ steps.ship_each.output }}"}
output:
  order: "${{ input.order_id }}"
  summary: "${{ steps.summary.output }}"
"""

SCHEMA = {"type": "object", "required": ["order_id"],
          "properties": {"order_id": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}}}
wf = Workflow("order-fulfilment", input_schema=SCHEMA, on=["order.created"])


@wf.step(input={"order": "${{ input.order_id }}", "items": "${{ input.items }}"},
         retry={"max_attempts": 3, "initial_delay": 0.1}, timeout=30)
def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"ok": True, "items": input["items"]}


@wf.step(needs=[reserve], map="${{ steps.reserve.output.items }}",
         retry={"max_attempts": 3, "initial_delay": 0.2, "max_delay": 2})
async def ship_each(item: Any, ctx: StepContext) -> dict[str, Any]:
    return {"parcel": f"P-{item}"}


wf.transform("summary", "{parcels: shipped[].parcel, count: length(shipped)}", needs=["ship_each"],
             when="${{ steps.reserve.output.ok }}", input={"shipped": "${{ steps.ship_each.output }}"})
wf.output = {"order": "${{ input.order_id }}", "summary": "${{ steps.summary.output }}"}


def test_code_and_yaml_hash_the_same() -> None:
    from_yaml = parse_definition(YAML)
    assert wf.definition() == from_yaml
    assert wf.definition().canonical() == from_yaml.canonical()
    assert wf.content_hash() == from_yaml.content_hash()
    # and the YAML `weft workflows show` prints reads back to the same content
    assert parse_definition(wf.to_yaml()).content_hash() == from_yaml.content_hash()


def test_typed_helpers_build_the_same_expressions() -> None:
    assert output_of(reserve)["items"] == "${{ steps.reserve.output.items }}"
    assert input_.order_id == "${{ input.order_id }}"
    assert item.sku == "${{ item.sku }}"
    assert output_of("reserve").ok == "${{ steps.reserve.output.ok }}"
    typed = Workflow("order-fulfilment", input_schema=SCHEMA, on=["order.created"])
    typed.step(reserve.__wrapped__, input={"order": input_.order_id, "items": input_["items"]},
               retry={"max_attempts": 3, "initial_delay": 0.1}, timeout=30)
    typed.step(ship_each.__wrapped__, needs=["reserve"], map=output_of("reserve")["items"],
               retry={"max_attempts": 3, "initial_delay": 0.2, "max_delay": 2})
    typed.transform("summary", "{parcels: shipped[].parcel, count: length(shipped)}", needs=["ship_each"],
                    when=output_of("reserve").ok, input={"shipped": output_of("ship_each")})
    typed.output = {"order": input_.order_id, "summary": output_of("summary")}
    assert typed.content_hash() == wf.content_hash()


class In(BaseModel):
    order_id: str
    qty: int = 1


class Out(BaseModel):
    total: int


typed_wf = Workflow("typed", input_schema=In)


@typed_wf.step
def price(input: In, ctx: StepContext) -> Out:
    assert isinstance(input, In)  # parsed on the worker, before the function runs
    return Out(total=input.qty * 3)


@typed_wf.step(needs=[price])
def wrong(input: In) -> Out:
    return {"total": "not a number"}  # type: ignore[return-value]


def test_pydantic_schemas_go_into_the_definition() -> None:
    d = typed_wf.definition()
    assert d.input_schema == In.model_json_schema()
    step = d.step("price")
    assert step.with_["callable"] == "tests.unit.test_sdk_workflow:price"
    assert step.with_["input_schema"]["required"] == ["order_id"]
    assert step.with_["output_schema"]["properties"]["total"]["type"] == "integer"


def _ctx(step: str) -> StepContext:
    return StepContext(execution_id="e", step_id=step, attempt=1, idempotency_key="k")


async def test_the_worker_resolves_the_callable_to_the_wrapper_and_parses_with_pydantic() -> None:
    handler = PythonStep(StepModules(("tests.unit.test_sdk_workflow",)))
    config = typed_wf.definition().step("price").with_
    assert await handler({"order_id": "A", "qty": 2}, config, _ctx("price")) == {"total": 6}
    with pytest.raises(StepInputInvalid, match="order_id"):
        await handler({"qty": 2}, config, _ctx("price"))
    with pytest.raises(StepOutputInvalid, match="total"):
        await handler({"order_id": "A"}, typed_wf.definition().step("wrong").with_, _ctx("wrong"))
    # async steps stay async (awaited on the loop, not run in a thread)
    assert await handler("x", wf.definition().step("ship_each").with_, _ctx("ship_each")) == {"parcel": "P-x"}


async def test_a_worker_that_does_not_allow_the_module_refuses_the_step() -> None:
    from services.worker.steps import CallableNotAllowed

    with pytest.raises(CallableNotAllowed):
        await PythonStep(StepModules(("examples",)))({"order_id": "A"}, typed_wf.definition().step("price").with_,
                                                     _ctx("price"))


def test_mistakes_are_refused_with_the_field() -> None:
    bad = Workflow("bad")
    bad.add("a", "noop", needs=["nowhere"])
    with pytest.raises(DefinitionError, match=r"steps\[0\].needs\[0\]"):
        bad.definition()
    with pytest.raises(ValueError, match="already has a step"):
        bad.add("a", "noop")
    with pytest.raises(TypeError, match="neither a step id"):
        Workflow("x").add("b", "noop", needs=[object()])

    def local(input: Any) -> Any:
        return input

    with pytest.raises(ValueError, match="module-level"):
        Workflow("x").step(local)
    with pytest.raises(TypeError, match=r"takes \(input, ctx\)"):
        Workflow("x").step(three)


def three(a: Any, b: Any, c: Any) -> None:
    return None


def test_load_names_a_workflow() -> None:
    assert load("tests.unit.test_sdk_workflow:typed_wf") is typed_wf
    with pytest.raises(ValueError, match="not a weft.Workflow"):
        load("tests.unit.test_sdk_workflow:price")
    with pytest.raises(ValueError, match="form"):
        load("no colon")


def test_the_public_module_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, weft; weft.Client; weft.Workflow; "
            "print(sorted(m for m in ('typer', 'fastapi', 'weft.cli', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_hostile_templates_are_refused_as_yaml_would_refuse_them() -> None:
    deep: Any = "${{ input.x }}"
    for _ in range(10_000):
        deep = [deep]
    bad = Workflow("deep")
    bad.add("a", "noop", input=deep)
    with pytest.raises(DefinitionError, match="deeper"):
        bad.definition()
    huge = Workflow("huge")
    huge.add("a", "noop", input=list(range(300_000)))
    with pytest.raises(DefinitionError, match="200000|elements|values"):
        huge.definition()
    with pytest.raises(KeyError, match="plain field name"):
        input_["a } }} ${{ secrets.X"]
    lone = Workflow("lone")
    lone.add("a", "noop", input={"x": "\ud800"})
    with pytest.raises(DefinitionError, match=r"steps\[0\]\.input"):
        lone.definition()
