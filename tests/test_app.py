"""`fastdm-app` in a real headless browser: Debian's Chromium driven by Playwright (no browser
download), against the app started on a free local port in a background process (one server for
the module). Chromium missing is a failure with the fix, not a skip; only FASTDM_SKIP_BROWSER=1
skips these tests.

Also used by tools/app_screenshots.py (start_app, pick_clip_and_prompts) for the docs/ screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("FASTDM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CLIP = "red_circle_right.gif"
SOURCE, TARGET = "a red circle moving right", "a blue circle moving right"
STATUS_DONE = "() => { const t = [...document.querySelectorAll('textarea')].map(t => t.value); " \
              "return t.some(v => v.startsWith('done') || v.startsWith('stopped') || v.startsWith('error')); }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(out_dir: Path, *extra: str, timeout: float = 240, command: list[str] | None = None):
    """``python -m fastdm.service.app`` (or ``command``) on a free port; returns (process, url) once it answers."""
    port = _free_port()
    with open(out_dir / "server.log", "w") as log:  # (the server keeps its own descriptor)
        proc = subprocess.Popen([*(command or [sys.executable, "-m", "fastdm.service.app"]), "--port", str(port), "--out-dir",
                                 str(out_dir / "runs"), *extra], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastdm-app exited with {proc.returncode}: {(out_dir / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"fastdm-app did not answer within {timeout} s: {(out_dir / 'server.log').read_text()[-2000:]}")


def stop_app(proc) -> None:
    """End a server :func:`start_app` started (killed if it does not stop in 20 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch_browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)


def pick_clip_and_prompts(page, url: str, *, steps: int, frames: int = 0, clip: str = CLIP, source: str = SOURCE,
                          target: str = TARGET, boxes: str | None = None) -> None:
    page.goto(url)
    page.get_by_label("Source prompt").wait_for(timeout=60000)
    page.get_by_label("Bundled clip (used when nothing is uploaded)").click()
    page.get_by_role("option", name=clip).click()
    page.get_by_label("Source prompt").fill(source)
    page.get_by_label("Target prompt").fill(target)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Frames (0 = all)").fill(str(frames))
    if boxes is not None:
        page.get_by_text("Limit the edit (optional)").click()
        page.get_by_label("Boxes (JSON, input pixels)").fill(boxes)


def status(page) -> str:
    return page.get_by_label("Status").input_value()


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("FASTDM_SKIP_BROWSER") == "1":
        pytest.skip("FASTDM_SKIP_BROWSER=1: browser tests skipped on request")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium), "
                    "set FASTDM_CHROMIUM to its path, or set FASTDM_SKIP_BROWSER=1 to skip the browser tests explicitly",
                    pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[test]' (no browser download is needed)", pytrace=False)
    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(browser, tmp_path_factory):  # (the browser first: without Chromium, fail before starting a server)
    out = tmp_path_factory.mktemp("app")
    proc, url = start_app(out, "--preview-every", "1")
    yield url, out
    stop_app(proc)


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1200, "height": 900})
    yield pg
    pg.close()


def test_edit_in_the_browser_shows_progress_video_and_downloads(app, page, tmp_path):
    url, _ = app
    pick_clip_and_prompts(page, url, steps=3, frames=4)
    page.screenshot(path=str(tmp_path / "before.png"))
    seen = set()
    page.get_by_role("button", name="Run").click()
    deadline = time.time() + 180
    while time.time() < deadline:
        s = status(page)
        if s.startswith("step "):
            seen.add(s.split(",")[0])
        if s.startswith(("done", "error")):
            break
        time.sleep(0.05)
    assert s.startswith("done: 3 steps"), s
    assert seen, "no live progress line was shown"  # e.g. "step 1/3", "step 2/3"
    assert all(x.startswith("step ") and x.endswith("/3") for x in seen)
    assert "vdds" in s and "s_ssm" in s
    # the input | edit player, the preview strip and the downloads
    video = page.locator("#result video")
    video.first.wait_for(state="visible", timeout=30000)
    src = video.first.get_attribute("src")
    assert src and "input_edit_view" in src
    assert page.locator("#preview img").count() == 1
    downloads = page.locator("#downloads")
    for name in ("red_circle_right_edit.mp4", "red_circle_right_edit_compare.mp4", "red_circle_right_edit.json"):
        downloads.locator(f'a[download="{name}"]').wait_for(timeout=30000)
    report_url = downloads.locator('a[download="red_circle_right_edit.json"]').get_attribute("href")
    report = json.loads(page.request.get(report_url if report_url.startswith("http") else url.rstrip("/") + report_url).text())
    assert report["steps_run"] == 3 and report["video"]["frames"] == 4 and report["config"]["target_prompt"] == TARGET
    page.screenshot(path=str(tmp_path / "after.png"), full_page=True)
    assert (tmp_path / "before.png").stat().st_size > 1000 and (tmp_path / "after.png").stat().st_size > 1000


def test_automatic_mask_in_the_browser(app, page):
    url, _ = app
    pick_clip_and_prompts(page, url, steps=2, frames=4)
    page.get_by_text("Limit the edit (optional)").click()
    page.locator("#mask_mode").get_by_label("auto").check()
    page.get_by_role("button", name="Run").click()
    page.wait_for_function(STATUS_DONE, timeout=120000)
    s = status(page)
    assert s.startswith("done: 2 steps") and "automatic mask: " in s and "red, blue" in s, s
    page.locator("#downloads").locator('a[download="red_circle_right_edit_mask.mp4"]').wait_for(timeout=30000)


def test_stop_ends_the_edit_early_with_a_result(app, page):
    url, _ = app
    pick_clip_and_prompts(page, url, steps=400, frames=4)
    page.get_by_role("button", name="Run").click()
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.startsWith('step 2/400'))",
                           timeout=120000)
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function(STATUS_DONE, timeout=120000)
    s = status(page)
    assert s.startswith("stopped after ") and s.split()[3] == "of" and int(s.split()[2]) < 400, s
    page.locator('#downloads a[download="red_circle_right_edit.json"]').wait_for()


def test_bad_input_shows_the_clis_one_line_message(app, page, tmp_path, capsys):
    from fastdm.cli import main as edit_main

    url, _ = app
    boxes_text = "[[1, 2, 3]]"
    pick_clip_and_prompts(page, url, steps=2, frames=4, boxes=boxes_text)
    page.get_by_role("button", name="Run").click()
    page.wait_for_function(STATUS_DONE, timeout=120000)
    shown = status(page)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(boxes_text)
    clip = ROOT / "fastdm" / "assets" / "clips" / CLIP
    assert edit_main([str(clip), "--source-prompt", SOURCE, "--target-prompt", TARGET, "--boxes", str(boxes),
                      "--out", str(tmp_path / "x.mp4")]) == 2
    cli = capsys.readouterr().err.strip().removeprefix("fastdm-edit: error: ")
    assert shown == "error: " + cli.replace(f"'{boxes}'", "(typed in the app)"), (shown, cli)
    assert page.locator("video").count() == 0

    # and with no clip at all
    page.goto(url)
    page.get_by_label("Source prompt").wait_for()
    page.get_by_role("button", name="Run").click()
    page.wait_for_function(STATUS_DONE, timeout=60000)
    assert status(page) == "error: no input video: upload a clip or pick a bundled one"


def test_without_gradio_the_command_says_how_to_install(monkeypatch, capsys):
    from fastdm.service.app import main

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main([]) == 2
    assert capsys.readouterr().err == "fastdm-app: error: Gradio is not installed; install it with: pip install 'fastdm[app]'\n"


def test_limits_refuse_an_upload_with_the_arithmetic(tmp_path):
    from fastdm.errors import BadInput
    from fastdm.service.app import Limits

    clip = ROOT / "fastdm" / "assets" / "clips" / CLIP  # 8 frames of 32x32
    Limits().check(clip)
    Limits(frames=4).check(clip, frames=4)  # (the form's frame cap reads only 4)
    for limits, frames, match in ((Limits(frames=4), None, "more than 4 frames"), (Limits(pixels=32 * 31), None, "32x32"),
                                  (Limits(upload_mb=1e-4), None, "MB, more than"), (Limits(seconds=0.1), None, r"s, more than"),
                                  (Limits(frames=4), 6, "`frames=6` is above")):
        with pytest.raises(BadInput, match=match):
            limits.check(clip, frames=frames)


def test_logins_come_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch, capsys):
    from fastdm.service.app import main, read_auth

    f = tmp_path / "users"
    f.write_text("# who may edit\nann:secret-1\nbob:pw:with:colons\n")
    assert read_auth(str(f)) == [("ann", "secret-1"), ("bob", "pw:with:colons")]
    monkeypatch.setenv("FASTDM_APP_AUTH", "cy:x, dee:y")
    assert read_auth(None) == [("cy", "x"), ("dee", "y")]
    monkeypatch.delenv("FASTDM_APP_AUTH")
    assert read_auth(None) is None
    f.write_text("nopassword\n")
    with pytest.raises(Exception, match="user:password"):
        read_auth(str(f))
    assert main(["--host", "0.0.0.0"]) == 2  # (refused before the model loads)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--auth" in err and "0.0.0.0" in err


def test_a_login_is_asked_and_an_over_size_upload_is_refused_in_the_page(browser, tmp_path):
    users = tmp_path / "users"
    users.write_text("ann:secret-1\n")
    proc, url = start_app(tmp_path, "--auth", str(users), "--max-frames", "4", "--max-upload-mb", "1")
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.get_by_label("username").wait_for(timeout=60000)
        assert page.get_by_label("Source prompt").count() == 0  # nothing of the app before the login
        page.get_by_label("username").fill("ann")
        page.get_by_label("password").fill("secret-1")
        page.get_by_role("button", name="Login").click()
        page.get_by_label("Source prompt").wait_for(timeout=60000)
        page.locator("#upload input[type=file]").set_input_files(str(ROOT / "fastdm" / "assets" / "clips" / CLIP))
        page.get_by_label("Source prompt").fill(SOURCE)
        page.get_by_label("Target prompt").fill(TARGET)
        page.get_by_label("Steps").fill("2")
        page.wait_for_timeout(1500)  # (the upload lands)
        page.get_by_role("button", name="Run").click()
        page.wait_for_function(STATUS_DONE, timeout=120000)
        shown = status(page)
        assert shown.startswith("error: the upload has more than 4 frames, this server's limit"), shown
        assert page.locator("video").count() == 0
        page.close()
    finally:
        stop_app(proc)


def test_the_form_shows_the_models_own_defaults_under_each_preset():
    """The form (and its preset dropdown) starts at what an edit of the served model resolves: the bundled UNet's
    fastdm.json (lr 4.0 x 12 with S-SSM 6000) for the default, the paper's schedule for `paper`; a model folder without
    measured defaults shows the built-in ones."""
    from fastdm.driver.config import PRESETS, EditConfig
    from fastdm.service.app import form_defaults

    d = form_defaults(None)
    assert (d.steps, d.lr, d.s_ssm_weight, d.stop) == (12, 4.0, 6000.0, "steps")
    p = form_defaults(None, "paper")
    assert (p.steps, p.lr) == (PRESETS["paper"]["steps"], PRESETS["paper"]["lr"])
    built_in = EditConfig("s", "t")
    assert form_defaults("/nonexistent-folder").lr == built_in.lr and form_defaults("/nonexistent-folder").steps == built_in.steps
