"""A real browser for the page tests: Debian's ``chromium`` (deploy/install.sh installs it), driven over the
Chrome DevTools Protocol with aiohttp's websocket client, so nothing is downloaded. Without a browser the
tests that use it fail and say why; set ``KESTREL_SKIP_BROWSER_TESTS=1`` to skip them on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = os.environ.get("KESTREL_CHROMIUM", "/usr/bin/chromium")


class Browser:
    """Headless Chromium over the DevTools protocol: navigate, read the DOM, click and type like a user."""

    def __init__(self, proc: subprocess.Popen, ws: aiohttp.ClientWebSocketResponse,
                 session: aiohttp.ClientSession) -> None:
        self.proc, self.ws, self.session = proc, ws, session
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def launch(cls, profile: Path) -> Browser:
        log_path = profile.with_suffix(".log")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--remote-debugging-address=127.0.0.1",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        session = aiohttp.ClientSession()
        try:
            port = await cls._devtools_port(proc, profile, log_path)
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await session.close()
            proc.kill()
            proc.wait()
            raise
        browser = cls(proc, ws, session)
        await browser.send("Page.enable")
        await browser.send("Runtime.enable")
        return browser

    @staticmethod
    async def _devtools_port(proc: subprocess.Popen, profile: Path, log_path: Path) -> int:
        """Chromium writes the port it chose to ``DevToolsActivePort`` in its profile."""
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            lines = active.read_text().splitlines() if active.exists() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            await asyncio.sleep(0.1)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise AssertionError(f"chromium ({CHROMIUM}) did not open its DevTools port; its output:\n{tail}")

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value")) for a in data["params"]["args"]))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"]["exceptionDetails"])[:500])

    async def send(self, method: str, **params: Any) -> dict:
        msg_id = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Poll until ``expression`` is truthy; while a page is still loading (no body yet) it is not."""
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = await self.eval(guarded)
            except AssertionError:  # the context went away mid-navigation
                value = None
            if value:
                return value
            await asyncio.sleep(0.1)
        where = await self.eval("location.href + ' ' + document.readyState")
        raise AssertionError(f"page never satisfied {expression!r} at {where}; console: {self.console[-5:]}")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (what a user does, not element.click())."""
        box = await self.wait_for(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); if (!el) return null;"
            " el.scrollIntoView({block: 'center'}); const r = el.getClientRects()[0];"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left",
                            clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    if os.environ.get("KESTREL_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("KESTREL_SKIP_BROWSER_TESTS=1: browser tests skipped on purpose")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        pytest.fail(f"no browser at {CHROMIUM}: run deploy/install.sh as root (installs Debian's chromium), "
                    "set KESTREL_CHROMIUM, or KESTREL_SKIP_BROWSER_TESTS=1 to skip on purpose")
    b = await Browser.launch(tmp_path / "chromium-profile")
    yield b
    await b.close()
