"""Driving the console in Debian's chromium with Playwright, against a real `weft up`.

`playwright install` cannot download a browser here, so the tests launch
/usr/bin/chromium (apt-get install chromium). Without it the tests skip,
except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("WEFT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


def need_chromium() -> None:
    missing = None
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)


def env(home: Path, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    out["WEFT_HOME"] = str(home)
    out["PYTHONPATH"] = str(ROOT)
    out.update(extra)
    return out


class Stack:
    """`weft up` as a subprocess, with the environment given."""

    def __init__(self, home: Path, **extra: str):
        self.home, self.extra = home, extra
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "up.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "weft", "up"], env=env(home, **extra), cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            info = home / "stack.json"
            if info.exists():
                data = json.loads(info.read_text())
                if data.get("pid") == self.proc.pid:
                    self.url = data["gateway_url"]
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"weft up did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def weft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "weft", *args], env=env(self.home, **self.extra), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"weft {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def key(self, scopes: str, *more: str) -> str:
        return json.loads(self.weft("keys", "create", "--scopes", scopes, *more, "--json").stdout)["key"]

    def publish(self, path: Path, text: str) -> None:
        path.write_text(text)
        self.weft("workflows", "publish", str(path))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Browser:
    """One chromium for a module; `page()` opens a fresh context that records every request's host."""

    def __init__(self, shots: Path):
        from playwright.sync_api import sync_playwright

        self.shots = shots
        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        self.contexts: list[Any] = []
        self.outside: list[str] = []  # requests to anywhere but 127.0.0.1
        self.errors: list[str] = []  # page errors and console errors (CSP violations show up here)

    def page(self, key: str | None = None) -> Any:
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        self.contexts.append(context)
        if key is not None:  # what the sign-in form does: the key in this tab's sessionStorage
            context.add_init_script(f"sessionStorage.setItem('weft.key', {json.dumps(key)})")
        page = context.new_page()
        page.set_default_timeout(20_000)

        def on_request(request: Any) -> None:
            parts = urlsplit(request.url)
            if parts.scheme in ("data", "blob", "about"):
                return
            if parts.hostname != "127.0.0.1":
                self.outside.append(request.url)

        page.on("request", on_request)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        def on_console(msg: Any) -> None:  # an answered 4xx is the test's business, not a page error
            if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
                self.errors.append(f"console: {msg.text}")

        page.on("console", on_console)
        return page

    def shot(self, page: Any, name: str) -> Path:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        for context in self.contexts:
            context.close()
        self.browser.close()
        self.pw.stop()


def screenshots_dir(tmp_path_factory: Any) -> Path:
    chosen = os.environ.get("WEFT_SCREENSHOTS")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def browser_fixture(tmp_path_factory: Any) -> Iterator[Browser]:
    need_chromium()
    browser = Browser(screenshots_dir(tmp_path_factory))
    try:
        yield browser
    finally:
        browser.close()
    assert not browser.outside, f"requests left 127.0.0.1: {browser.outside}"
