"""Issue 16 part 2 item 2: every file a README transcript uses is shipped under examples/, and the
README's commands are the ones tests/e2e/test_examples.py runs (the list cannot drift)."""

from __future__ import annotations

import re

from tests.readme_transcripts import README, ROOT, SKIPPED, files_used, normalize, readme_commands, shipped


def test_every_file_a_readme_transcript_uses_is_shipped() -> None:
    """Issue 16 part 2 item 2: the files README's commands name exist (at their path or in examples/)."""
    missing = {name for command in readme_commands() for name in files_used(command) if shipped(name) is None}
    assert not missing, f"README commands use files that are not shipped: {sorted(missing)}"


def test_every_examples_path_the_readme_names_exists() -> None:
    """Issue 16 part 2 item 2: `examples/...` in README.md's prose names a shipped file."""
    named = set(re.findall(r"examples/[\w./-]+\.(?:yaml|py)", README.read_text()))
    assert named and all((ROOT / n).is_file() for n in named), sorted(n for n in named if not (ROOT / n).is_file())


def test_the_step_code_the_examples_call_is_shipped() -> None:
    """Issue 16 part 2 item 2: every `callable` of an example lives in examples/ (where `weft up`, run in the
    project folder, imports it from), not in tests/."""
    import yaml

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for step in (yaml.safe_load(path.read_text()) or {}).get("steps", []):
            target = (step.get("with") or {}).get("callable")
            if target:
                module, _, name = target.partition(":")
                assert module.startswith("examples."), (path.name, target)
                source = ROOT / (module.replace(".", "/") + ".py")
                assert source.is_file() and f"def {name}(" in source.read_text(), (path.name, target)


def test_the_readme_commands_are_parsed_and_normalized() -> None:
    """Issue 16 part 2 item 2: ids, dead-letter prefixes and times become placeholders; skipped ones are in it."""
    commands = readme_commands()
    assert len(commands) > 15
    assert normalize("weft status 308e7eca-bd8c-48e8-ad9e-8248c4f47715  # a comment") == "weft status <ID>"
    assert normalize("weft dlq show 00a0763f") == "weft dlq show <DLQ>"
    assert set(SKIPPED) <= set(commands), set(SKIPPED) - set(commands)
