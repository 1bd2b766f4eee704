"""The README's ComfyUI picture and the UI-format workflow, from ComfyUI's own page in a real browser.

    python tools/comfyui_screenshot.py [--env .comfyui] [--png docs/comfyui-workflow.png] [--ui examples/comfyui/edit.json]

Starts the test ComfyUI (``tools/comfyui_env.py``) with the pack installed by ``fastdm-comfy install``, opens
its page in Debian's Chromium through Playwright, loads ``examples/comfyui/edit.api.json`` with the page's
own ``app.loadApiJson``, saves what the page serializes (``app.graph.serialize()``: the UI format, to drop
on the page) as ``examples/comfyui/edit.json``, presses *Queue Prompt*, waits for the edit to finish and
takes the screenshot (the saved gif and the mask preview show in their nodes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from comfyui_env import start_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
LAYOUT = {1: [20, 20], 2: [20, 330], 3: [370, 20], 4: [820, 20], 5: [820, 340], 6: [1120, 340]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default=str(ROOT / ".comfyui"))
    p.add_argument("--png", default=str(ROOT / "docs" / "comfyui-workflow.png"))
    p.add_argument("--ui", default=str(ROOT / "examples" / "comfyui" / "edit.json"))
    args = p.parse_args()
    env = Path(args.env).resolve()
    subprocess.run([str(Path(sys.executable).parent / "fastdm-comfy"), "install", str(env / "ComfyUI"),
                    "--python", str(env / "venv" / "bin" / "python")], check=True)
    api = json.loads((ROOT / "examples" / "comfyui" / "edit.api.json").read_text())
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "input").mkdir()
        shutil.copy(ROOT / "fastdm" / "assets" / "clips" / "red_circle_right.gif", work / "input")
        port = _free_port()
        proc = start_server(env, work, port)
        url = f"http://127.0.0.1:{port}/"
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
                page = browser.new_page(viewport={"width": 1700, "height": 900})
                page.goto(url)
                page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph.registered_node_types['FastDMEdit']",
                                       timeout=120000)
                page.evaluate("(api) => app.loadApiJson(api)", api)
                # a tidy layout (loaders left, edit in the middle, outputs right) and a fixed seed (the page's
                # default for a `seed` widget is to randomize it after each run)
                page.evaluate("""(pos) => {
                    for (const [id, xy] of Object.entries(pos)) { app.graph.getNodeById(+id).pos = xy; }
                    for (const n of app.graph._nodes) for (const w of n.widgets || [])
                        if (w.name === "control_after_generate") w.value = "fixed";
                    const ds = app.canvas.ds; ds.scale = 0.85; ds.offset = [10, 30];
                    app.graph.setDirtyCanvas(true, true); }""", LAYOUT)
                ui = page.evaluate("() => app.graph.serialize()")
                Path(args.ui).write_text(json.dumps(ui, indent=1) + "\n")
                page.get_by_role("button", name="Queue Prompt").click()
                deadline = time.time() + 600
                while time.time() < deadline:  # until the queue is empty and the prompt is in the history
                    with urllib.request.urlopen(url + "queue") as r:
                        q = json.loads(r.read())
                    with urllib.request.urlopen(url + "history") as r:
                        h = json.loads(r.read())
                    if not q["queue_running"] and not q["queue_pending"] and h:
                        break
                    time.sleep(1)
                (entry,) = h.values()
                if entry["status"]["status_str"] != "success":
                    raise SystemExit(f"the workflow failed: {entry['status']['messages']}")
                page.wait_for_timeout(2000)
                page.screenshot(path=args.png)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"wrote {args.png} and {args.ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
