"""Workflow definitions: what parses, and rejections that name the field and the line."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.definitions import (
    BUILTIN_STEP_TYPES,
    DefinitionError,
    Problem,
    RetryPolicy,
    WorkflowDef,
    check_rules,
    parse_definition,
    validate_input,
)

# The example of DESIGN.md, "The shape of a definition", verbatim.
DESIGN_EXAMPLE = """\
name: order-fulfilment
on:                                  # trigger event types (CloudEvents `type`)
  - event: order.created
input_schema:                        # JSON Schema of the execution input
  type: object
  required: [order_id]
steps:
  - id: reserve
    type: python
    with: {callable: "shop.steps:reserve"}
    input: {order: "${{ input.order_id }}"}
    retry: {max_attempts: 5, initial_delay: 0.2, max_delay: 10, multiplier: 2, jitter: true}
    timeout: 30
  - id: notify
    type: http
    needs: [reserve]
    when: "${{ steps.reserve.output.ok }}"
    with: {method: POST, url: "https://example.com/hook"}
    input: {body: "${{ steps.reserve.output }}"}
  - id: ship_each
    type: python
    needs: [reserve]
    map: "${{ steps.reserve.output.items }}"   # one task per item, outputs in order
    with: {callable: "shop.steps:ship"}
output: "${{ steps.ship_each.output }}"
"""

BASE = """\
name: w
steps:
  - id: a
    type: noop
  - id: b
    type: noop
    needs: [a]
"""


def test_the_design_example_parses() -> None:
    wf = parse_definition(DESIGN_EXAMPLE)
    assert wf.name == "order-fulfilment"
    assert [t.event for t in wf.on] == ["order.created"]
    assert wf.input_schema == {"type": "object", "required": ["order_id"]}
    assert [s.id for s in wf.steps] == ["reserve", "notify", "ship_each"]
    reserve, notify, ship = wf.steps
    assert reserve.type == "python" and reserve.with_ == {"callable": "shop.steps:reserve"}
    assert reserve.input == {"order": "${{ input.order_id }}"}
    assert reserve.retry == RetryPolicy(max_attempts=5, initial_delay=0.2, max_delay=10, multiplier=2, jitter=True)
    assert reserve.timeout == 30
    assert notify.needs == ("reserve",) and notify.when == "${{ steps.reserve.output.ok }}"
    assert notify.with_ == {"method": "POST", "url": "https://example.com/hook"}
    assert ship.map == "${{ steps.reserve.output.items }}" and ship.retry == RetryPolicy()
    assert wf.output == "${{ steps.ship_each.output }}"
    assert wf.children("reserve") == ["notify", "ship_each"]
    assert wf.downstream("reserve") == {"reserve", "notify", "ship_each"}
    assert wf.step("notify") is notify


def test_the_design_example_parses_from_json_and_from_a_mapping() -> None:
    data = yaml.safe_load(DESIGN_EXAMPLE.replace("\non:", "\n'on':"))
    assert parse_definition(json.dumps(data, indent=2)) == parse_definition(DESIGN_EXAMPLE)
    assert parse_definition(data) == parse_definition(DESIGN_EXAMPLE)
    assert parse_definition(DESIGN_EXAMPLE.encode()) == parse_definition(DESIGN_EXAMPLE)


def test_the_canonical_form_round_trips() -> None:
    wf = parse_definition(DESIGN_EXAMPLE)
    again = WorkflowDef.model_validate(wf.canonical())
    assert again == wf and again.content_hash() == wf.content_hash()
    assert "with" in wf.canonical()["steps"][0]  # the wire name, not with_


# ---- `on:` and YAML 1.1 --------------------------------------------------------------------


def test_the_on_key_is_a_string_not_yaml_1_1_true() -> None:
    # PyYAML's default (YAML 1.1) loader reads `on:` as the boolean True.
    assert True in yaml.safe_load("on: []")
    wf = parse_definition("name: w\non:\n  - event: a.b\n  - cron: '0 * * * *'\n    timezone: Europe/Paris\n  - webhook: {path: /hooks/w}\nsteps:\n  - {id: a, type: noop}\n")
    assert [t.event for t in wf.on] == ["a.b", None, None]
    assert wf.on[1].cron == "0 * * * *" and wf.on[1].timezone == "Europe/Paris"
    assert wf.on[2].webhook is not None and wf.on[2].webhook.path == "/hooks/w"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("y", "y"), ("true", True), ("false", False)],
)
def test_yaml_1_1_booleans_stay_strings(value: str, expected: Any) -> None:
    wf = parse_definition(f"name: w\nsteps:\n  - id: a\n    type: noop\n    input: {{v: {value}}}\n")
    assert wf.steps[0].input == {"v": expected}


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("{}", "exactly one"),
        ("{event: a.b, cron: '* * * * *'}", "exactly one"),
        ("{event: 'has space'}", "pattern"),
        ("{webhook: {path: 'no-slash'}}", "pattern"),
        ("{event: a.b, missed: sometimes}", "skip"),
    ],
)
def test_a_bad_trigger_names_its_entry_and_line(trigger: str, message: str) -> None:
    text = f"name: w\non:\n  - event: ok.one\n  - {trigger}\nsteps:\n  - {{id: a, type: noop}}\n"
    with pytest.raises(DefinitionError) as info:
        parse_definition(text)
    (problem,) = info.value.problems
    assert problem.path.startswith("on[1]") and problem.line == 4
    assert message in problem.message


# ---- rejections: field and line -------------------------------------------------------------


REJECTIONS: list[tuple[str, str, str, int, str]] = [
    # (case, text, path, line, words in the message)
    (
        "cycle",
        "name: w\nsteps:\n  - id: a\n    type: noop\n    needs: [c]\n  - id: b\n    type: noop\n    needs: [a]\n  - id: c\n    type: noop\n    needs: [b]\n",
        "steps[",
        0,
        "cycle",
    ),
    ("unknown parent", BASE + "  - id: c\n    type: noop\n    needs: [a, zz]\n", "steps[2].needs[1]", 10, "unknown step 'zz'"),
    ("unknown parent, block list", BASE + "  - id: c\n    type: noop\n    needs:\n      - a\n      - zz\n", "steps[2].needs[1]", 12, "'zz'"),
    ("self parent", BASE + "  - id: c\n    type: noop\n    needs: [c]\n", "steps[2].needs[0]", 10, "itself"),
    ("duplicate id", BASE + "  - id: a\n    type: noop\n", "steps[2].id", 8, "duplicate step id 'a'"),
    ("unknown step type", BASE + "  - id: c\n    type: rocket\n", "steps[2].type", 9, "unknown step type 'rocket'"),
    ("bad expression", BASE + '  - id: c\n    type: noop\n    input: {x: "${{ input.[ }}"}\n', "steps[2].input.x", 10, "bad expression"),
    ("unterminated expression", BASE + '  - id: c\n    type: noop\n    input: {x: "${{ input.x"}\n', "steps[2].input.x", 10, "unterminated"),
    ("unterminated, nested", BASE + '  - id: c\n    type: noop\n    input:\n      deep: ["${{ input.x }} and ${{ input.y"]\n', "steps[2].input.deep[0]", 11, "unterminated"),
    ("bad expression in with", BASE + '  - id: c\n    type: noop\n    with: {url: "${{ ) }}"}\n', "steps[2].with.url", 10, "bad expression"),
    ("bad map expression", BASE + '  - id: c\n    type: noop\n    map: "${{ input.[ }}"\n', "steps[2].map", 10, "bad expression"),
    ("when not an expression", BASE + "  - id: c\n    type: noop\n    when: input.go\n", "steps[2].when", 10, "expression"),
    ("when is text around one", BASE + '  - id: c\n    type: noop\n    when: "go ${{ input.go }}"\n', "steps[2].when", 10, "expression"),
    ("when is two expressions", BASE + '  - id: c\n    type: noop\n    when: "${{ input.a }} ${{ input.b }}"\n', "steps[2].when", 10, "expression"),
    ("map not an expression", BASE + "  - id: c\n    type: noop\n    map: [1, 2]\n", "steps[2].map", 10, "string"),
    (
        "not upstream",
        BASE + '  - id: c\n    type: noop\n    needs: [a]\n    input: "${{ steps.b.output }}"\n',
        "steps[2].input",
        11,
        "steps.b, which is not upstream",
    ),
    ("not upstream in when", BASE + '  - id: c\n    type: noop\n    when: "${{ steps.a.output }}"\n', "steps[2].when", 10, "steps.a"),
    ("downstream reference", BASE.replace("    type: noop\n  - id: b", '    type: noop\n    input: "${{ steps.b.output }}"\n  - id: b'), "steps[0].input", 5, "steps.b"),
    ("output names no step", BASE + 'output: "${{ steps.zz.output }}"\n', "output", 8, "steps.zz, which is not a step"),
    ("bad input schema", "name: w\ninput_schema:\n  type: objekt\nsteps:\n  - {id: a, type: noop}\n", "input_schema", 2, "objekt"),
    ("input schema not a mapping", "name: w\ninput_schema: [1]\nsteps:\n  - {id: a, type: noop}\n", "input_schema", 2, "dictionary"),
    ("unknown top-level key", "name: w\nbogus: 1\nsteps:\n  - {id: a, type: noop}\n", "bogus", 2, "Extra inputs"),
    ("unknown step key", BASE + "  - id: c\n    type: noop\n    needz: [a]\n", "steps[2].needz", 10, "Extra inputs"),
    ("bad retry", BASE + "  - id: c\n    type: noop\n    retry: {max_attempts: 0}\n", "steps[2].retry.max_attempts", 10, "greater than or equal to 1"),
    ("bad step id", BASE + "  - id: 9-lives\n    type: noop\n", "steps[2].id", 8, "pattern"),
    ("bad name", "name: ' spaced'\nsteps:\n  - {id: a, type: noop}\n", "name", 1, "pattern"),
    ("missing name", "steps:\n  - {id: a, type: noop}\n", "name", 0, "required"),
    ("no steps", "name: w\nsteps: []\n", "steps", 2, "at least 1"),
    ("bad timeout", BASE + "  - id: c\n    type: noop\n    timeout: -1\n", "steps[2].timeout", 10, "greater than 0"),
    ("not yaml", "name: w\nsteps:\n  - id: a\n    type: [noop\n", "<document>", 0, ""),
    ("not a mapping", "- just\n- a list\n", "<document>", 0, "mapping"),
    # hostile definitions (issue 13): refused with the field and the limit, never a crash
    ("expression 400 brackets deep", BASE + '  - id: c\n    type: noop\n    input: {v: "${{ ' + "[" * 400 + "]" * 400
     + ' }}"}\n', "steps[2].input.v", 10, "nested deeper than 32 levels"),
    ("expression 400 projections deep", BASE + '  - id: c\n    type: noop\n    input: {v: ["${{ a' + "[*]" * 400
     + ' }}"]}\n', "steps[2].input.v[0]", 10, "nested deeper than"),
    ("expression too long in map", BASE + '  - id: c\n    type: noop\n    map: "${{ ' + "a." * 1500 + 'a }}"\n',
     "steps[2].map", 10, "longer than 2000 characters"),
    ("literal nested deeply", BASE + '  - id: c\n    type: noop\n    input: {v: "${{ `' + "[" * 40 + "]" * 40
     + '` }}"}\n', "steps[2].input.v", 10, "nested deeper than 32 levels"),
    ("5000-deep YAML", "name: w\nsteps:\n  - {id: a, type: noop, input: " + "[" * 5000 + "]" * 5000 + "}\n",
     "<document>", 3, "nested deeper than 100 levels"),
    ("900-deep JSON", '{"name": "w", "steps": [{"id": "a", "type": "noop", "input": ' + "[" * 900 + "]" * 900 + "}]}",
     "<document>", 1, "nested deeper than 100 levels"),
    ("YAML alias bomb", "name: w\nsteps:\n  - {id: a, type: noop, input: {x0: &a0 [1,1,1,1,1,1,1,1,1,1], "
     + "".join(f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "], " for i in range(1, 9)) + "y: *a8}}\n",
     "<document>", 3, "more than 200000 values (with its aliases expanded)"),
    ("lone surrogate", BASE + '  - id: c\n    type: noop\n    input: {v: "\\ud800"}\n', "steps[2].input.v", 10,
     "lone UTF-16 surrogate"),
    ("integer over 64 bits", BASE + "  - id: c\n    type: noop\n    input: {v: [1, 100000000000000000000000]}\n",
     "steps[2].input.v[1]", 10, "64-bit range"),
]


@pytest.mark.parametrize(("case", "text", "path", "line", "words"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_a_rejection_names_the_field_and_the_line(case: str, text: str, path: str, line: int, words: str) -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition(text)
    problems = info.value.problems
    assert len(problems) == 1, problems  # one mistake, one problem: no noise
    problem = problems[0]
    assert problem.path.startswith(path) if path.endswith("[") else problem.path == path
    if line:
        assert problem.line == line
    assert words in problem.message
    assert problem.path in str(info.value)  # what a person sees names the field
    if problem.line:
        assert f"line {problem.line}" in str(info.value)


def test_a_cycle_names_its_steps() -> None:
    text = "name: w\nsteps:\n  - id: a\n    type: noop\n    needs: [b]\n  - id: b\n    type: noop\n    needs: [a]\n"
    with pytest.raises(DefinitionError) as info:
        parse_definition(text)
    (problem,) = info.value.problems
    assert problem.message in ("cycle: a -> b -> a", "cycle: b -> a -> b")
    assert problem.path in ("steps[0].needs", "steps[1].needs") and problem.line in (5, 8)


def test_json_text_gets_line_numbers_too() -> None:
    text = '{\n  "name": "w",\n  "steps": [\n    {"id": "a", "type": "noop"},\n    {"id": "b", "type": "noop", "needs": ["q"]}\n  ]\n}\n'
    with pytest.raises(DefinitionError) as info:
        parse_definition(text)
    assert [(p.path, p.line) for p in info.value.problems] == [("steps[1].needs[0]", 5)]


def test_a_mapping_has_no_lines_but_still_names_the_field() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition({"name": "w", "steps": [{"id": "a", "type": "rocket"}]})
    assert [(p.path, p.line) for p in info.value.problems] == [("steps[0].type", None)]


def test_several_problems_are_reported_together() -> None:
    text = BASE + "  - id: c\n    type: rocket\n    needs: [zz]\n  - id: a\n    type: noop\n"
    with pytest.raises(DefinitionError) as info:
        parse_definition(text)
    assert sorted(p.path for p in info.value.problems) == ["steps[2].needs[0]", "steps[2].type", "steps[3].id"]


def test_step_types_can_be_extended() -> None:
    text = BASE + "  - id: c\n    type: rocket\n"
    wf = parse_definition(text, step_types=BUILTIN_STEP_TYPES | {"rocket"})
    assert wf.step("c").type == "rocket"
    assert check_rules(wf) and check_rules(wf)[0].path == "steps[2].type"


@pytest.mark.parametrize(
    "expression",
    [
        "${{ input.steps.x }}",  # a field called `steps` in the input is not a step reference
        "${{ item.steps.x }}",
        "${{ steps.a.output || input.fallback }}",
        "${{ [steps.a.output, steps.a.status] }}",
        "${{ length(steps.a.output) }}",
    ],
)
def test_expressions_that_are_fine(expression: str) -> None:
    parse_definition(BASE + f'  - id: c\n    type: noop\n    needs: [b]\n    input: "{expression}"\n')


def test_problem_text() -> None:
    assert str(Problem(path="steps[0].id", message="bad", line=3)) == "steps[0].id (line 3): bad"
    assert str(Problem(path="name", message="bad")) == "name: bad"


# ---- cycles, exhaustively -------------------------------------------------------------------


@st.composite
def needs_graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    ids = [f"s{i}" for i in range(draw(st.integers(1, 6)))]
    return {i: sorted(draw(st.sets(st.sampled_from(ids), max_size=3))) for i in ids}


def _acyclic(graph: dict[str, list[str]]) -> bool:
    done: set[str] = set()
    on_path: set[str] = set()

    def visit(node: str) -> bool:
        if node in done:
            return True
        if node in on_path:
            return False
        on_path.add(node)
        ok = all(visit(p) for p in graph[node])
        done.add(node)
        return ok

    return all(visit(n) for n in graph)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(needs_graphs())
def test_a_definition_is_accepted_exactly_when_its_needs_are_acyclic(graph: dict[str, list[str]]) -> None:
    body = {"name": "w", "steps": [{"id": k, "type": "noop", "needs": v} for k, v in graph.items()]}
    if _acyclic(graph):
        parse_definition(body)
        return
    with pytest.raises(DefinitionError) as info:
        parse_definition(body)
    assert any("cycle" in p.message or "itself" in p.message for p in info.value.problems)


# ---- content hash ---------------------------------------------------------------------------


def test_the_content_hash_is_stable_across_key_order_and_spelling() -> None:
    a = parse_definition("name: w\nsteps:\n  - id: a\n    type: noop\n    with: {x: 1, y: 2}\n    retry: {max_attempts: 4, jitter: false}\n")
    b = parse_definition(
        '{"steps": [{"retry": {"jitter": false, "max_attempts": 4}, "with": {"y": 2, "x": 1}, "type": "noop", "id": "a"}], "name": "w"}'
    )
    c = parse_definition("# a comment\nname: w\nsteps:\n  - {type: noop, id: a, with: {y: 2, x: 1}, retry: {max_attempts: 4, jitter: false, multiplier: 2}}\n")
    assert a.content_hash() == b.content_hash() == c.content_hash()
    assert a.content_hash().startswith("sha256:") and len(a.content_hash()) == len("sha256:") + 64
    assert a.content_hash() == a.model_copy().content_hash()


@pytest.mark.parametrize(
    "change",
    [
        ("with: {x: 1, y: 2}", "with: {x: 1, y: 3}"),
        ("max_attempts: 4", "max_attempts: 5"),
        ("name: w", "name: w2"),
        ("type: noop", "type: python"),
        ("    with", "    input: {a: 1}\n    with"),
    ],
)
def test_the_content_hash_changes_with_the_content(change: tuple[str, str]) -> None:
    text = "name: w\nsteps:\n  - id: a\n    type: noop\n    with: {x: 1, y: 2}\n    retry: {max_attempts: 4}\n"
    before, after = change
    assert parse_definition(text).content_hash() != parse_definition(text.replace(before, after)).content_hash()


def test_the_order_of_steps_is_content() -> None:
    one = parse_definition("name: w\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n")
    two = parse_definition("name: w\nsteps:\n  - {id: b, type: noop}\n  - {id: a, type: noop}\n")
    assert one.content_hash() != two.content_hash()


# ---- validate_input -------------------------------------------------------------------------

SCHEMA_DEF = """\
name: w
input_schema:
  type: object
  required: [order_id]
  properties:
    order_id: {type: string}
    items: {type: array, items: {type: integer}}
    customer:
      type: object
      properties:
        email: {type: string, format: email, pattern: "@"}
steps:
  - {id: a, type: noop}
"""


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ({"order_id": 5}, "input.order_id", "is not of type 'string'"),
        ({}, "input", "'order_id' is a required property"),
        ({"order_id": "o", "items": [1, "x"]}, "input.items[1]", "'x' is not of type 'integer'"),
        ({"order_id": "o", "customer": {"email": "nope"}}, "input.customer.email", "does not match"),
        ([1], "input", "is not of type 'object'"),
    ],
)
def test_validate_input_names_the_failing_field(value: Any, path: str, words: str) -> None:
    wf = parse_definition(SCHEMA_DEF)
    problems = validate_input(wf, value)
    assert [p.path for p in problems] == [path]
    assert words in problems[0].message


def test_validate_input_accepts_a_good_input_and_anything_without_a_schema() -> None:
    assert validate_input(parse_definition(SCHEMA_DEF), {"order_id": "o", "items": [1, 2]}) == []
    assert validate_input(parse_definition(BASE), ["anything", 1]) == []


def test_validate_input_reports_every_problem() -> None:
    problems = validate_input(parse_definition(SCHEMA_DEF), {"order_id": 1, "items": ["a", 2, "b"]})
    assert [p.path for p in problems] == ["input.items[0]", "input.items[2]", "input.order_id"]


def test_a_bad_cron_or_time_zone_names_its_entry_and_line() -> None:
    text = (
        "name: c\n"
        "on:\n"
        "  - cron: 'not a cron'\n"
        "  - {cron: '* * * * *', timezone: Mars/Base}\n"
        "  - {cron: '* * * * * */10', timezone: Europe/Paris}\n"
        "steps: [{id: a, type: noop}]\n"
    )
    with pytest.raises(DefinitionError) as info:
        parse_definition(text)
    assert [(p.path, p.line) for p in info.value.problems] == [("on[0].cron", 3), ("on[1].timezone", 4)]
    assert "'not a cron'" in info.value.problems[0].message and "Mars/Base" in info.value.problems[1].message
    with pytest.raises(DefinitionError):  # not only from text: every path checks it
        parse_definition({"name": "c", "on": [{"cron": "61 * * * *"}], "steps": [{"id": "a", "type": "noop"}]})
