"""Make the README's screenshots (Resources/Screenshots/) with the real tools: `ensam demo`'s overlay, and
`ensam web` on the bundled sample CT in headless Chromium (a box and a click, on a laptop and a phone).

    .venv/bin/python Testing/webapp/make_screenshots.py [--checkpoint MODEL] [--out Resources/Screenshots]

Uses the default model unless --checkpoint is given: run it again when the default model changes,
so that the pictures show what a user gets. Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from chromium_cdp import Chromium, Page, find_chromium

ROOT = Path(__file__).resolve().parents[2]
# Where to draw in the axial view (fractions of the view): the box corners and the click, on the
# sample CT's liver-like organ (left of the view's centre, as the sample's suggested box).
BOX = ((0.24, 0.22), (0.50, 0.74))
CLICK = (0.37, 0.48)
JPEG_QUALITY = 70


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg(png_path: Path, out: Path) -> Path:
    from PIL import Image

    with Image.open(png_path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    out.write_bytes(buffer.getvalue())
    return out


async def _browse(url: str, work: Path, out: Path) -> list[Path]:
    from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS

    status = "document.getElementById('ensam-status').innerText"
    timing = "document.getElementById('ensam-timing').innerText"
    shots = []
    with Chromium(find_chromium(), work / "profile") as browser:
        page = await Page.open(browser.port)
        try:
            await page.set_viewport(1280, 800)
            await page.navigate(url)
            await page.wait_for(f"!!document.getElementById('ensam-status') && {status}.startsWith('Ready')", 300,
                                "the image to be encoded")
            view = await page.evaluate(
                "JSON.stringify([...document.querySelectorAll('.layout-grid-item')].map(e => e.getBoundingClientRect())"
                ".sort((a, b) => b.width * b.height - a.width * a.height)[0])")
            view = json.loads(view)
            at = lambda f: (view["x"] + f[0] * view["width"], view["y"] + f[1] * view["height"])  # noqa: E731
            tool = "window.trame.state.get('ensam_tool')"
            await page.press_key(ACTIONS["box"][1].lower())
            # the server must be placing before the first corner (else that click is lost), as in the browser test
            await page.wait_for(f"{tool} === 'box'", 10, "the Box tool (its key)")
            await page.click_at(*at(BOX[0]))
            await page.send("Input.dispatchMouseEvent", type="mouseMoved", x=at(CLICK)[0], y=at(CLICK)[1])
            await page.click_at(*at(BOX[1]))
            try:
                await page.wait_for(f"{timing}.startsWith('Box:')", 120, "the box result")
            except Exception:
                print("page status:", await page.evaluate(status), "|", await page.evaluate(timing))
                raise
            await page.press_key(ACTIONS["foreground"][1].lower())
            await page.wait_for(f"{tool} === 'foreground'", 10, "the + Click tool")
            await page.click_at(*at(CLICK))
            await page.wait_for(f"{timing}.startsWith('Click:')", 300, "the click result")
            await page.press_key(ACTIONS["foreground"][1].lower())  # the tool off: no place cursor in the picture
            await asyncio.sleep(2)  # the views' last frames
            shots.append(_jpeg(await page.screenshot(work / "web.png"), out / "ensam-web.jpg"))
            await page.set_viewport(390, 844)  # a phone held upright: the same scene
            await page.navigate(url)
            await page.wait_for(f"!!document.getElementById('ensam-status') && {status} !== ''", 60, "the page")
            await asyncio.sleep(3)
            shots.append(_jpeg(await page.screenshot(work / "phone.png"), out / "ensam-web-phone.jpg"))
        finally:
            await page.close()
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="model file (default: the default model)")
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    ensam = [sys.executable, "-m", "ENSAMSegmentLib.cli.main"]
    with tempfile.TemporaryDirectory(prefix="ensam-shots-") as folder:
        work = Path(folder)
        subprocess.run([*ensam, "demo", "--out", str(work / "demo"), *model], check=True)
        shutil.copy(work / "demo" / "ensam-sample-ct-overlay.png", args.out / "ensam-demo-overlay.png")
        port = _free_port()
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen([*ensam, "web", "--port", str(port), *model], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            for _ in range(600):
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.2)
            try:
                shots = asyncio.run(_browse(url, work, args.out))
            except Exception:
                print("-- ensam web's log --\n" + (work / "server.log").read_text(errors="replace")[-4000:])
                raise
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    for path in [args.out / "ensam-demo-overlay.png", *shots]:
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
