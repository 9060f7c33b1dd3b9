"""`ensam web` end to end in a real headless Chromium (Debian's /usr/bin/chromium, over DevTools).

The server runs as `python -m ENSAMSegmentLib.cli.main web` on a free loopback port with a small
real model; the browser loads the page, and every prompt goes through the page the way a user
gives it: the Box tool by its keyboard shortcut, the box itself by two real mouse clicks in the
axial view (trame's remote-controlled area forwards them to Slicer's ROI widget on the server),
the + Click tool by its button and a mouse click in the view, then Save segmentation. The saved
.seg.nrrd (written by the server from its scene) and the browser's download must hold the segment
the page reports. A screenshot of the final page is written to the test's temp folder.
The same server then serves narrow windows (a small laptop window, a phone, a tablet): the note,
the status and every button must lie inside the window and work. The last test stops the server
with Ctrl+C, as a user does, and reads its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from chromium_cdp import Chromium, Page, find_chromium

from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS

KEYS = {action: key.lower() for action, (_label, key) in ACTIONS.items()}  # the shared shortcuts

VIEWPORT = (1280, 800)
CHROMIUM_MISSING = ("Debian chromium is not installed (`make setup` installs it through "
                    ".ci/install-system-packages; or: apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip(CHROMIUM_MISSING)
    return path


class WebServer:
    """A running `ensam web` subprocess."""

    def __init__(self, command: list[str], url: str, out_dir: Path, log_path: Path):
        self.url, self.out_dir, self.log_path = url, out_dir, log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env)

    def stop(self) -> int:
        """Ctrl+C (the way a user stops it; killed if it hangs); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture(scope="module")
def web_server(small_image, small_model, tmp_path_factory):
    """A running `ensam web` on a free loopback port, shared by this module's tests, stopped afterwards."""
    port = _free_port()
    folder = tmp_path_factory.mktemp("web")
    command = [sys.executable, "-m", "ENSAMSegmentLib.cli.main", "web", "--host", "127.0.0.1", "--port", str(port),
               "--image", str(small_image[0]), "--checkpoint", str(small_model), "--device", "cpu",
               "--out-dir", str(folder / "saved")]
    server = WebServer(command, f"http://127.0.0.1:{port}/", folder / "saved", folder / "server.log")
    try:
        _wait_for_http(server.url, server.process, server.log_path, timeout=90)
        yield server
    finally:
        server.stop()


def _wait_for_http(url: str, process, log_path: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            pytest.fail(f"ensam web exited with {process.returncode}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"ensam web did not answer at {url} in {timeout} s:\n{_log_tail(log_path)}")


def _log_tail(path: Path, lines: int = 40) -> str:
    noise = ("WindowResizeEvent", "ConfigureEvent", "Warning: In vtkObject", "vtkObserverManager")
    text = [line for line in path.read_text(errors="replace").splitlines() if line and not any(n in line for n in noise)]
    return "\n".join(text[-lines:])


def _text(element_id: str) -> str:
    return f"document.getElementById('{element_id}').innerText"


def _voxels(segment_text: str) -> int:
    match = re.search(r"^ENSAM 1: (\d+) voxels", segment_text)
    assert match, f"no voxel count in the page's segment line: {segment_text!r}"
    return int(match.group(1))


async def _browse(chromium_path: str, url: str, work: Path) -> dict:
    """Drive the page; returns what was seen (texts, timings, paths)."""
    seen = {}
    downloads = work / "downloads"
    downloads.mkdir()
    with Chromium(chromium_path, work / "profile") as browser:
        page = await Page.open(browser.port)
        try:
            await page.set_viewport(*VIEWPORT)
            await page.allow_downloads(downloads)
            await page.navigate(url)

            # the page: title, tools, status; the image is encoded on the server
            await page.wait_for(f"!!document.getElementById('ensam-status') && {_text('ensam-status')}.startsWith('Ready')",
                                timeout=60, what="the status 'Ready' (image encoded)")
            seen["title"] = await page.evaluate("document.title")
            seen["buttons"] = await page.evaluate(
                "['box','foreground','background','undo','reset','next','save']"
                ".map(a => document.getElementById('ensam-' + a).innerText.trim())")
            seen["timing_encoded"] = await page.evaluate(_text("ensam-timing"))
            seen["note"] = await page.evaluate(_text("ensam-note"))
            views = await page.wait_for(
                "(() => { const v = [...document.querySelectorAll('img.image-display-area')]"
                ".map(e => e.getBoundingClientRect()).filter(r => r.width > 50 && r.height > 50);"
                " return v.length === 3 ? JSON.stringify(v) : null; })()", timeout=30, what="three slice views")
            axial = max(json.loads(views), key=lambda r: r["width"] * r["height"])  # the large view

            # Box: its keyboard shortcut, then two real clicks (opposite corners) in the axial view
            await page.press_key(KEYS["box"])
            await page.wait_for("window.trame.state.get('ensam_tool') === 'box'", 10, "the Box tool (its key)")
            corner = lambda fx, fy: (axial["x"] + fx * axial["width"], axial["y"] + fy * axial["height"])  # noqa: E731
            await page.click_at(*corner(0.30, 0.30))
            await page.send("Input.dispatchMouseEvent", type="mouseMoved", x=corner(0.4, 0.45)[0],
                            y=corner(0.4, 0.45)[1])
            await page.click_at(*corner(0.55, 0.60))
            await page.wait_for(f"{_text('ensam-timing')}.startsWith('Box:')", 60, "the box result")
            seen["after_box"] = [await page.evaluate(_text(i)) for i in ("ensam-status", "ensam-timing", "ensam-segment")]

            # + Click: its button, then a real click inside the box
            await page.evaluate("document.getElementById('ensam-foreground').click()")
            await page.wait_for("window.trame.state.get('ensam_tool') === 'foreground'", 10, "the + Click tool")
            await page.click_at(*corner(0.45, 0.45))
            await page.wait_for(f"{_text('ensam-timing')}.startsWith('Click:')", 60, "the click result")
            seen["after_click"] = [await page.evaluate(_text(i)) for i in ("ensam-status", "ensam-timing", "ensam-segment")]

            # Save segmentation: written by the server (--out-dir) and downloaded by the browser
            await page.evaluate("document.getElementById('ensam-save').click()")
            await page.wait_for(f"{_text('ensam-saved')}.startsWith('Saved')", 30, "the save")
            seen["saved"] = await page.evaluate(_text("ensam-saved"))
            end = time.monotonic() + 20
            while not list(downloads.glob("*.seg.nrrd")) and time.monotonic() < end:
                await asyncio.sleep(0.1)
            seen["downloads"] = sorted(downloads.glob("*.seg.nrrd"))
            seen["screenshot"] = await page.screenshot(work / "ensam-web.png")  # the segment after box + click

            # Undo (key X) brings back the box's segment; Next object (button) starts segment 2
            await page.press_key(KEYS["undo"])
            await page.wait_for(f"{_text('ensam-status')}.startsWith('Object 1: step 1.') && "
                                "!window.trame.state.get('ensam_busy')", 60, "the undo")
            seen["after_undo"] = await page.evaluate(_text("ensam-segment"))
            await page.evaluate("document.getElementById('ensam-next').click()")
            await page.wait_for(f"{_text('ensam-segment')}.startsWith('ENSAM 2')", 10, "the next object")
            seen["after_next"] = [await page.evaluate(_text(i)) for i in ("ensam-status", "ensam-segment")]
        finally:
            await page.close()
    return seen


def test_browser_box_click_save(chromium, web_server, tmp_path):
    from ENSAMSegmentLib.core.imageio import read_segmentation_nrrd

    out_dir, log_path = web_server.out_dir, web_server.log_path
    started = time.monotonic()
    try:
        seen = asyncio.run(_browse(chromium, web_server.url, tmp_path))
    except Exception as error:
        raise AssertionError(f"{error}\n-- server log --\n{_log_tail(log_path)}") from error
    print(f"browser session: {time.monotonic() - started:.1f} s; screenshot: {tmp_path / 'ensam-web.png'}")

    assert seen["title"] == "ENSAM"
    assert seen["buttons"] == [f"{label} [{key}]" for label, key in ACTIONS.values()] + ["Save segmentation"]
    assert re.fullmatch(r"Image encoded in \d+ ms\.", seen["timing_encoded"])
    assert "untrained" in seen["note"]

    status, timing, segment = seen["after_box"]
    assert status.startswith("Object 1: step 1.") and re.fullmatch(r"Box: \d+ ms \(model \d+ ms\)\.", timing)
    assert _voxels(segment) > 0, "the box gave an empty segment"
    status, timing, segment = seen["after_click"]
    assert status == "Object 1: step 2." and re.fullmatch(r"Click: \d+ ms \(model \d+ ms\)\.", timing)
    voxels = _voxels(segment)

    # the server's scene, as Slicer's writer saved it, holds exactly what the page reports
    saved = out_dir / "phantom-ensam.seg.nrrd"
    assert seen["saved"] == f"Saved {saved}"
    labels, geometry, segments = read_segmentation_nrrd(saved)
    assert [s.name for s in segments] == ["ENSAM 1"]
    assert int((labels == segments[0].label).sum()) == voxels > 0
    assert [p.name for p in seen["downloads"]] == ["phantom-ensam.seg.nrrd"]
    assert seen["downloads"][0].read_bytes() == saved.read_bytes()

    assert _voxels(seen["after_undo"]) == _voxels(seen["after_box"][2])
    assert seen["after_next"] == ["Next object: ENSAM 2. Draw a box, or click on the structure.",
                                  "ENSAM 2: 0 voxels (0 mL), 2 segment(s)"]

    png = seen["screenshot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


# The page at these window sizes: a laptop's small window, a phone held upright, a tablet on its side.
NARROW_WINDOWS = [(800, 600), (390, 844), (960, 600)]
VISIBLE = """(() => {{ const r = document.getElementById('{id}').getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0 && r.right <= {w} && r.bottom <= {h}; }})()"""


async def _narrow(chromium_path: str, url: str, work: Path) -> dict:
    """At each narrow size: which panel elements lie fully inside the window, the views' sizes, and whether
    a button still works (the + Click tool on, then off)."""
    seen = {}
    with Chromium(chromium_path, work / "profile") as browser:
        page = await Page.open(browser.port)
        try:
            for w, h in NARROW_WINDOWS:
                await page.set_viewport(w, h)
                await page.navigate(url)
                await page.wait_for(f"!!document.getElementById('ensam-status') && {_text('ensam-status')} !== ''",
                                    timeout=60, what="the status line")
                ids = ["ensam-note", "ensam-status", "ensam-save"] + [f"ensam-{action}" for action in ACTIONS]
                visible = {i: await page.evaluate(VISIBLE.format(id=i, w=w, h=h)) for i in ids}
                views = await page.wait_for(  # the views' boxes (each clips its streamed image)
                    "(() => { const v = [...document.querySelectorAll('.layout-grid-item')]"
                    ".map(e => e.getBoundingClientRect()).filter(r => r.width > 50 && r.height > 50);"
                    " return v.length === 3 ? JSON.stringify(v) : null; })()", timeout=30, what="three slice views")
                tool = "window.trame.state.get('ensam_tool')"
                before = await page.evaluate(tool)
                for expected in ("null" if before == "foreground" else "'foreground'", json.dumps(before)):
                    await page.evaluate("document.getElementById('ensam-foreground').click()")
                    await page.wait_for(f"{tool} === {expected}", 10, f"the + Click button to make the tool {expected}")
                seen[(w, h)] = visible, json.loads(views)
                await page.screenshot(work / f"ensam-web-{w}x{h}.png")
        finally:
            await page.close()
    return seen


def test_narrow_windows_show_the_note_status_and_every_button(chromium, web_server, tmp_path):
    try:
        seen = asyncio.run(_narrow(chromium, web_server.url, tmp_path))
    except Exception as error:
        raise AssertionError(f"{error}\n-- server log --\n{_log_tail(web_server.log_path)}") from error
    for (w, h), (visible, views) in seen.items():
        hidden = [element for element, shown in visible.items() if not shown]
        assert not hidden, f"at {w}x{h} these are not fully inside the window: {hidden}"
        assert all(v["x"] >= 0 and v["x"] + v["width"] <= w + 1 and v["y"] + v["height"] <= h + 1 for v in views), \
            f"at {w}x{h} a view is not inside the window: {views}"
        assert max(v["height"] for v in views) > h / 4, f"at {w}x{h} the views are too small: {views}"


def test_ctrl_c_stops_the_server_and_its_log_has_no_vtk_noise(web_server):
    """Run last in this module: it stops the shared server."""
    assert web_server.stop() == 0, f"Ctrl+C did not stop the server cleanly:\n{_log_tail(web_server.log_path)}"
    log = web_server.log_path.read_text(errors="replace")
    assert "WindowResizeEvent" not in log and "Warning: In vtkObject" not in log, log[:2000]
