"""Headless Chromium driven over the Chrome DevTools Protocol, for the fleet page's test.

Chromium talks CDP over a pipe (``--remote-debugging-pipe``: it reads commands
on fd 3 and writes answers and events on fd 4, each message JSON ended by a NUL
byte), so no websocket client and no debugging port are needed. Debian's
``chromium`` is the browser (``make test`` installs it when run as root).

::

    with Browser.launch(chromium_binary(), tmp_path / "chromium") as browser:
        page = browser.new_page(width=1280, height=900)
        page.goto("http://127.0.0.1:31313/fleet")
        page.wait_for("document.querySelector('[data-worker]') !== null", timeout=20, what="a worker")
        page.click("button[data-action='load']")
        page.screenshot(tmp_path / "fleet.png")
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BINARY_ENV = "CORTEX_CHROMIUM"
FLAGS = [
    "--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--mute-audio", "--hide-scrollbars", "--password-store=basic",
]  # fmt: skip


def chromium_binary() -> str | None:
    """The browser to drive: ``$CORTEX_CHROMIUM``, else the first of `CANDIDATES` on the PATH."""
    if os.environ.get(BINARY_ENV):
        return os.environ[BINARY_ENV]
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class CdpError(AssertionError):
    """Chromium answered a command with an error, or not in time."""


class Browser:
    """One Chromium process and its CDP pipe; a reader thread files answers by id and keeps the events."""

    def __init__(self, proc: subprocess.Popen[bytes], commands: int, answers: int) -> None:
        self.proc = proc
        self._commands = commands
        self._answers = answers
        self._next_id = 0
        self._results: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    @classmethod
    @contextlib.contextmanager
    def launch(cls, binary: str, profile: Path, log: Path | None = None) -> Iterator[Browser]:
        profile.mkdir(parents=True, exist_ok=True)
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Out of the way of 3 and 4, which bash (dash takes single-digit fds only) points at them in the browser.
        read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_browser_r, from_browser_w))
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        flags = [*FLAGS, f"--user-data-dir={profile}", "about:blank"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
        script = f'exec "$0" "$@" 3<&{read_end} 4>&{write_end} {read_end}<&- {write_end}>&-'
        out = open(log or os.devnull, "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(["bash", "-c", script, binary, *flags], pass_fds=(read_end, write_end),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        finally:
            out.close()
            os.close(read_end)
            os.close(write_end)
        browser = cls(proc, to_browser_w, from_browser_r)
        try:
            browser.send("Browser.getVersion", timeout=30)  # up and answering
            yield browser
        finally:
            browser.close()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self._answers, 1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._results[-1] = {"error": {"message": "the browser closed its pipe"}}
                    self._cond.notify_all()
                return
            buffer += data
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._results[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """Send one command and return its result; raises CdpError on an error or after `timeout` seconds."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._results:
                if -1 in self._results:
                    raise CdpError(f"{method}: {self._results[-1]['error']['message']}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CdpError(f"{method}: no answer within {timeout:.0f}s")
                self._cond.wait(left)
            answer = self._results.pop(ident)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def new_page(self, *, width: int, height: int, mobile: bool = False) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for method in ("Page.enable", "Runtime.enable"):
            page.send(method)
        page.resize(width=width, height=height, mobile=mobile)
        return page

    def exceptions(self) -> list[str]:
        """Uncaught JavaScript exceptions any page reported."""
        with self._cond:
            events = list(self.events)
        thrown = [e["params"]["exceptionDetails"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
        return [d.get("exception", {}).get("description") or d.get("text", "?") for d in thrown]

    def close(self) -> None:
        with contextlib.suppress(CdpError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._commands)
        self._reader.join(timeout=5)
        os.close(self._answers)


class Page:
    """One tab, through its flattened CDP session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def resize(self, *, width: int, height: int, mobile: bool = False) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})  # fmt: skip

    def goto(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float, what: str) -> Any:
        """Poll `expression` until it is truthy; its value. Fails with `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} in the page")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed, released) in the middle of the element `selector` finds, scrolled into view."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
        )
        if box is None:
            raise AssertionError(f"nothing on the page matches {selector}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left",
                                                   "clickCount": 1})  # fmt: skip

    def screenshot(self, path: Path) -> Path:
        """The whole page (not only the viewport) as a PNG at `path`."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
        return path
