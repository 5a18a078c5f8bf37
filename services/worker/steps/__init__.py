"""Step types: the registry the worker looks handlers up in, and the built-in types.

What lives here:

* `StepRegistry` (type name -> handler), `StepHandler` (the protocol a handler
  meets: `async (input, config, ctx) -> JSON-able output`), `StepTypeError` (the
  package's root error: a bad type or `with:` config, naming the field);
* the built-in types `python`, `transform`, `sleep`, `noop` and `http`, one
  module each, and `default_registry()` that registers them;
* `allowlist.py`, the modules `python` steps may call (`StepModules`);
* `ssrf.py`, the guard every `http` step goes through (`HttpPolicy`,
  `SsrfBlocked`).

A handler may also have `validate_config(config)`; `StepRegistry.validate_config`
calls it so a bad definition is refused before anything is stored. Values that
are `${{ }}` templates are only known at run time, so static checks skip them
and the handler checks them again when it runs.

Who may import it: the worker runtime (`services.worker`) to run steps, and the
service that publishes definitions (gateway/CLI) to call `validate_config`.
It imports only `weft` (the step-author API), `contracts` and third-party
libraries; nothing of the orchestrator, store or broker, and the pure core
never imports it.
"""

from __future__ import annotations

from services.worker.steps.http_step import (
    HttpClientError,
    HttpRetryableStatus,
    HttpStep,
    HttpTransportError,
    ResponseTooLarge,
    TooManyRedirects,
)
from services.worker.steps.allowlist import CallableNotAllowed, StepModules, discover
from services.worker.steps.noop import NoopStep
from services.worker.steps.pycall import CallableImportError, OutputNotJSONError, PythonStep
from services.worker.steps.registry import (
    ConfigValidator,
    StepHandler,
    StepInputError,
    StepRegistry,
    StepTypeError,
    UnknownStepTypeError,
)
from services.worker.steps.sleep import SleepStep
from services.worker.steps.ssrf import HostResolutionError, HttpPolicy, SsrfBlocked, check_url
from services.worker.steps.transform import TransformError, TransformStep

__all__ = [
    "BUILTIN_STEP_TYPES",
    "default_registry",
    "StepRegistry",
    "StepHandler",
    "ConfigValidator",
    "StepTypeError",
    "UnknownStepTypeError",
    "StepInputError",
    "HttpPolicy",
    "SsrfBlocked",
    "HostResolutionError",
    "check_url",
    "PythonStep",
    "TransformStep",
    "SleepStep",
    "NoopStep",
    "HttpStep",
    "CallableImportError",
    "CallableNotAllowed",
    "StepModules",
    "discover",
    "OutputNotJSONError",
    "TransformError",
    "HttpClientError",
    "HttpRetryableStatus",
    "HttpTransportError",
    "ResponseTooLarge",
    "TooManyRedirects",
]

BUILTIN_STEP_TYPES: frozenset[str] = frozenset({"python", "transform", "sleep", "noop", "http"})


def default_registry(http_policy: HttpPolicy | None = None, step_modules: StepModules | None = None) -> StepRegistry:
    """A fresh registry with the built-in types.

    `http_policy` governs what `http` steps may reach; `step_modules` which modules
    `python` steps may call (none when not given).
    """
    registry = StepRegistry()
    registry.register("python", PythonStep(step_modules))
    registry.register("transform", TransformStep())
    registry.register("sleep", SleepStep())
    registry.register("noop", NoopStep())
    registry.register("http", HttpStep(http_policy))
    return registry
