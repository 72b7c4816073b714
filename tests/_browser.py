"""Headless Chromium with the network blocked, for the tests that check a page renders offline.

One place launches the browser for ``tests/test_docs.py`` and ``tests/test_analysis.py``:
:func:`chromium` finds Debian's ``chromium`` or skips the calling test with the reason (so ``-rs``
prints it), :func:`render_offline` loads a page once and returns its DOM and what it fetched, and
:class:`DevTools` drives a browser over the DevTools protocol for tests that must wait and look.
Every launch sends the network to a dead proxy and resolves no host, and logs the requests the
page made, so a test can assert the page asked the network for nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

NO_CHROMIUM = "Debian's chromium is not installed (scripts/test.sh installs it when run as root)"
OFFLINE = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium() -> str:
    """The browser's path; skips the calling test, saying why, when it is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(NO_CHROMIUM)
    return browser


def render_offline(
    url: str, net_log: Path, screenshot: Path, *, window: str, budget_ms: int, timeout: float
) -> tuple[str, list[str]]:
    """The page's DOM after ``budget_ms`` of virtual time (a screenshot saved too), and the URLs it fetched."""
    command = [
        chromium(),
        "--headless=new",
        *OFFLINE,
        f"--log-net-log={net_log}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={screenshot}",
        f"--window-size={window}",
        "--dump-dom",
        url,
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=timeout).stdout
    return dom, page_requests(net_log)


def page_requests(net_log: Path) -> list[str]:
    """URLs the page asked for other than file: and data: (the browser's own requests have no origin)."""
    data = json.loads(net_log.read_text())
    start = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    params = [e["params"] for e in data["events"] if e["type"] == start and "url" in e.get("params", {})]
    return [
        p["url"]
        for p in params
        if p.get("initiator") != "not an origin" and not p["url"].startswith(("file:", "data:"))
    ]


class DevTools:
    """Headless Chromium, offline, driven over the DevTools protocol on a pipe (no extra Python package needed)."""

    def __init__(self, net_log: Path, window: str):
        browser = chromium()
        flags = [*OFFLINE, f"--window-size={window}", f"--log-net-log={net_log}"]
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def chrome_fds() -> None:  # the protocol pipe is fd 3 (commands in) and fd 4 (replies out)
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.process = subprocess.Popen(
            [browser, "--headless=new", "--remote-debugging-pipe", *flags, "about:blank"],
            preexec_fn=chrome_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._id, self._buffer, self._session = 0, b"", None

    def send(self, method: str, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply.get('error')}"
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            self._session = None
            self.send("Browser.close")
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            os.close(self._write)
            os.close(self._read)
