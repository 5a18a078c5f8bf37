"""Cost of the step-security checks on the worker's hot path: secret resolution, redaction, the
module allowlist. Run: .venv/bin/python bench/step_security.py"""
import time
from datetime import datetime, timezone
from contracts.messages import StepReady
from services.worker.secrets import SecretSource
from services.worker.steps import StepModules
NOW = datetime.now(timezone.utc)
plain = StepReady(execution_id="e", workflow="w", step_id="s", attempt=1, step_type="http",
                  config={"url": "https://a.example/x", "headers": {"X": "1"}}, input={"body": {"k": list(range(50))}},
                  idempotency_key="e:s", scheduled_at=NOW)
with_secrets = plain.model_copy(update={"config": {"url": "https://a.example/x", "headers": {"Authorization": "Bearer ${{ secrets.T }}"}},
                                        "secrets": {"/config/headers/Authorization": "Bearer ${{ secrets.T }}", "/input/body/t": "${{ secrets.U }}"},
                                        "input": {"body": {"k": list(range(50)), "t": "${{ secrets.U }}"}}})
src = SecretSource(environ={"WEFT_SECRET_T": "tok-abcdef123456", "WEFT_SECRET_U": "u-secret-98765"})
output = {"status": 200, "headers": {f"h{i}": "v" * 40 for i in range(20)}, "body": {"items": [{"id": i, "name": "x" * 20} for i in range(100)]}}
def bench(name, fn, n=20000):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    print(f"{name}: {(time.perf_counter() - t) / n * 1e6:.1f} µs")
bench("resolve, no secrets (every step)", lambda: src.resolve(plain))
bench("resolve, 2 secrets", lambda: src.resolve(with_secrets))
r = src.resolve(with_secrets)
bench("redact a 7 KB output, 2 secrets", lambda: r.redact(output), n=5000)
m = StepModules(("shop.steps", "billing", "examples"))
bench("allowlist check of a path", lambda: m.check_path("billing.tasks.deep:charge"), n=100000)
