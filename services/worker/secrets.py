"""Secrets on the worker: resolve `${{ secrets.NAME }}` at the last moment, redact them on the way out.

The orchestrator leaves secret references as they are (contracts/secrets.py),
and a `StepReady` says where they sit (`ready.secrets`: JSON pointer ->
template). Just before the handler runs, the worker substitutes each one from

* its environment: `WEFT_SECRET_<NAME>` (the name as written, case kept), or
* a secrets folder (`WEFT_SECRETS_DIR`): one file per secret, named after it,
  as Docker and Kubernetes mount them; one trailing newline is dropped.

The environment wins when both have it. Substituted strings are `Secret`
instances (a `str`), so the `http` step can tell which headers carry one.
Whatever the handler returns or raises is then redacted: every value of a
secret it was given becomes `***` in the output, the error message and the
traceback, before the result leaves the worker.

A missing secret fails the step non-retryably, naming the secret (never a value).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from contracts import secrets as refs
from contracts.messages import StepError, StepReady
from weft.steps import NonRetryableError

__all__ = ["Secret", "SecretSource", "MissingSecret", "Resolved", "ENV_PREFIX", "REDACTED", "MAX_SECRET_BYTES"]

ENV_PREFIX = "WEFT_SECRET_"
REDACTED = "***"
MAX_SECRET_BYTES = 64 * 1024


class Secret(str):
    """A string that holds a secret's value (it behaves as the plain string it is)."""

    __slots__ = ()

    def __repr__(self) -> str:  # a repr in a log line or a traceback shows no value
        return "Secret('***')"


class MissingSecret(NonRetryableError):
    """A step refers to a secret this worker does not have."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"secret {name!r} {reason}")
        self.name = name
        self.reason = reason


class SecretSource:
    """Where this worker's secrets come from: its environment, then a secrets folder."""

    def __init__(self, directory: Path | None = None, environ: Mapping[str, str] | None = None,
                 prefix: str = ENV_PREFIX):
        self.directory = directory
        self.environ = os.environ if environ is None else environ
        self.prefix = prefix

    def where(self, name: str) -> str:
        places = f"set {self.prefix}{name} in the worker's environment"
        if self.directory is not None:
            places += f" or put a file named {name} in {self.directory}"
        else:
            places += " (or set WEFT_SECRETS_DIR to a folder with a file of that name)"
        return places

    def get(self, name: str) -> str:
        value = self.environ.get(self.prefix + name)
        if value is None and self.directory is not None:
            value = self._file(name)
        if value is None:
            raise MissingSecret(name, f"is not set on this worker: {self.where(name)}")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SECRET_BYTES:
            raise MissingSecret(name, f"is larger than {MAX_SECRET_BYTES} bytes")
        if value == "":
            raise MissingSecret(name, f"is empty on this worker: {self.where(name)}")
        return value

    def _file(self, name: str) -> str | None:
        assert self.directory is not None
        path = self.directory / name  # NAME is letters, digits and '_': no way out of the folder
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_SECRET_BYTES + 2)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise MissingSecret(name, f"cannot be read from {path}: {exc.strerror}") from None
        if len(raw) > MAX_SECRET_BYTES + 1:
            raise MissingSecret(name, f"is larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MissingSecret(name, f"in {path} is not UTF-8 text") from None
        return text[:-1] if text.endswith("\n") else text

    def resolve(self, ready: StepReady, input: Any = ...) -> Resolved:
        """The step's config and input with its secret references substituted.

        `input`: the step's input as the worker has it by now, when that is not `ready.input`
        (e.g. after large payload references were fetched); the references are found in it.
        """
        data = ready.input if input is ... else input
        if not ready.secrets:
            return Resolved(ready.config, data, ())
        # Copies: the message (and anything logged from it) keeps the references.
        doc = orjson.loads(orjson.dumps({"config": ready.config, "input": data}))
        values: list[str] = []

        def lookup(name: str) -> str:
            value = self.get(name)
            values.append(value)
            return value

        for pointer, template in ready.secrets.items():
            if not isinstance(template, str) or not refs.names_in(template):
                continue
            refs.set_at(doc, pointer, Secret(refs.substitute(template, lookup)))
        # Longest first, so a secret that contains another is hidden whole.
        known = tuple(sorted({v for v in values if v}, key=len, reverse=True))
        return Resolved(doc["config"], doc["input"], known)


class Resolved:
    """A step's resolved config and input, and the secret values to redact from what comes back."""

    __slots__ = ("config", "input", "values")

    def __init__(self, config: Any, input: Any, values: tuple[str, ...]):
        self.config, self.input, self.values = config, input, values

    def redact_text(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def redact(self, value: Any) -> Any:
        """`value` with every secret value inside its strings (keys too) replaced by ***."""
        if not self.values:
            return value
        if isinstance(value, str):
            return self.redact_text(str(value))
        if isinstance(value, dict):
            return {self.redact_text(str(k)): self.redact(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        return value

    def redact_error(self, error: StepError | None) -> StepError | None:
        if error is None or not self.values:
            return error
        return error.model_copy(update={
            "message": self.redact_text(error.message),
            "traceback": self.redact_text(error.traceback) if error.traceback else error.traceback,
        })
