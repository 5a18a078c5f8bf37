"""The `weft` commands of README.md's transcripts, as tests/e2e/test_examples.py runs them.

Issue 16 part 2 item 2: every README transcript is run against `weft up`, so the README cannot
drift. A command is named by its README text with the README's ids, dead-letter prefixes and
times written as <ID>, <DLQ> and <TIME> (`normalize`); the end-to-end test substitutes real ones,
runs it, and at the end checks it ran every README command but those in SKIPPED, each with why.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README commands the transcript test does not run, and where they are tested instead.
SKIPPED: dict[str, str] = {
    "weft up": "the test's fixture runs `weft up` in the project folder",
    "weft gateway --port 8787": "a deployment's gateway with keys: tests/integration/test_gateway_auth.py",
}

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z\b")
_PREFIX = re.compile(r"(weft dlq (?:show|reprocess|discard) )[0-9a-f]{8}\b")


def normalize(command: str) -> str:
    """A command as the README shows it, comments dropped and ids written as placeholders."""
    command = re.sub(r"\s+#.*$", "", command.strip())
    command = _TIME.sub("<TIME>", _UUID.sub("<ID>", command))
    return " ".join(_PREFIX.sub(r"\1<DLQ>", command).split())


def readme_commands(text: str | None = None) -> list[str]:
    """Every `$ weft ...` line inside README.md's fenced blocks, normalized, in order, once each."""
    text = README.read_text() if text is None else text
    found: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced and line.startswith("$ weft "):
            command = normalize(line[2:])
            if command not in found:
                found.append(command)
    return found


def files_used(command: str) -> list[str]:
    """The files a command names (definitions and @data files)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    return [w.lstrip("@") for w in words if w.lstrip("@").endswith((".yaml", ".yml", ".json", ".py"))]


def shipped(name: str) -> Path | None:
    """Where a file a README command uses is shipped: at its path, or under examples/."""
    for path in (ROOT / name, ROOT / "examples" / Path(name).name):
        if path.is_file():
            return path
    return None
