"""Screenshots of `fastdm-app` before and after an edit, for docs/ (run from the repository root).

    python tools/app_screenshots.py [--steps N] [--out docs]     # N: the default preset's step count

Starts the app on a free local port, drives Debian's Chromium with Playwright (the helpers of
tests/test_app.py), edits the bundled red circle into a blue one, and writes docs/app-before.png
and docs/app-after.png as small palette PNGs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_app import launch_browser, pick_clip_and_prompts, start_app, status, stop_app


def _small_png(path: Path) -> None:
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=96).save(path, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from fastdm.driver.config import EditConfig

    ap.add_argument("--steps", type=int, default=EditConfig("s", "t").steps)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_app(Path(tmp))
        try:
            with sync_playwright() as p:
                browser = launch_browser(p)
                page = browser.new_page(viewport={"width": 1200, "height": 860})
                pick_clip_and_prompts(page, url, steps=args.steps)
                page.screenshot(path=str(out / "app-before.png"))
                page.get_by_role("button", name="Run").click()
                while not status(page).startswith(("done", "stopped", "error")):
                    time.sleep(0.5)
                print(status(page))
                page.locator("#result video").first.wait_for(state="visible", timeout=60000)
                time.sleep(2)  # let the player show a frame
                page.screenshot(path=str(out / "app-after.png"), full_page=True)
                browser.close()
        finally:
            stop_app(proc)
    for name in ("app-before.png", "app-after.png"):
        _small_png(out / name)
        print(out / name, (out / name).stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
