"""A small Chrome DevTools Protocol client: headless Debian Chromium driven over its websocket.

Playwright and pyppeteer download their own browser, which fails on these machines, so the tests
start /usr/bin/chromium themselves and speak CDP through aiohttp's websocket client (aiohttp comes
with trame's server, wslink). Only what the browser tests need: navigate, evaluate JavaScript,
mouse events, screenshots, downloads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# The flags this machine needs (env notes): no sandbox as root, no GPU, no network chatter.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1280,800",
    "--hide-scrollbars", "--mute-audio",
)


class CDPError(RuntimeError):
    """The browser answered a command with an error, or did not answer in time."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class Chromium:
    """A headless Chromium process with a fresh profile in ``profile_dir`` (use as a context manager)."""

    def __init__(self, executable: str, profile_dir: Path, start_timeout: float = 30.0):
        self.profile_dir = Path(profile_dir)
        self.log_path = self.profile_dir.parent / f"{self.profile_dir.name}-chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile_dir}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.port = self._wait_for_port(start_timeout)

    def _wait_for_port(self, timeout: float) -> int:
        """Chromium writes the port it chose into <profile>/DevToolsActivePort."""
        port_file = self.profile_dir / "DevToolsActivePort"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise CDPError(f"chromium exited with code {self.process.returncode}; see {self.log_path}")
            if port_file.is_file():
                text = port_file.read_text().split()
                if text:
                    return int(text[0])
            time.sleep(0.05)
        raise CDPError(f"chromium did not open its DevTools port in {timeout} s; see {self.log_path}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One page (tab) of the browser, over its own DevTools websocket. Async: use inside asyncio."""

    def __init__(self, session, ws):
        self._session, self._ws = session, ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: list[tuple[str, asyncio.Future]] = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int) -> Page:
        """The browser's first page target."""
        import aiohttp

        session = aiohttp.ClientSession()
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return cls(session, ws)

    async def set_viewport(self, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif "method" in data:
                for name, future in list(self._listeners):
                    if name == data["method"] and not future.done():
                        future.set_result(data.get("params", {}))
                        self._listeners.remove((name, future))

    async def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        """Run one CDP command; returns its result or raises CDPError."""
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise CDPError(f"{method}: no answer in {timeout} s") from None
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def event(self, method: str) -> asyncio.Future:
        """A future for the next event named ``method`` (register before causing it)."""
        future = asyncio.get_running_loop().create_future()
        self._listeners.append((method, future))
        return future

    async def navigate(self, url: str, timeout: float = 30.0) -> None:
        await self.send("Page.enable")
        loaded = self.event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, timeout)

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"JavaScript error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        end = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > end:
                raise CDPError(f"timed out after {timeout} s waiting for {what or expression}")
            await asyncio.sleep(0.1)

    async def click_at(self, x: float, y: float, button: str = "left") -> None:
        """A real mouse click (move, press, release) at page coordinates."""
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        await self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button=button, clickCount=1)
        await self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button=button, clickCount=1)

    async def press_key(self, key: str) -> None:
        """A key press and release of one printable character."""
        common = dict(key=key, code=f"Key{key.upper()}", windowsVirtualKeyCode=ord(key.upper()))
        await self.send("Input.dispatchKeyEvent", type="keyDown", text=key, **common)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **common)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(data["data"]))
        return Path(path)

    async def allow_downloads(self, folder: Path) -> None:
        await self.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder))

    async def close(self) -> None:
        self._reader.cancel()
        await self._ws.close()
        await self._session.close()
