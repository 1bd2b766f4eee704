"""The README's own commands, read from README.md and run from the repository root as a user would.

Only ``--out`` is moved into a temporary folder (so a test run leaves the checkout as it was); the rest
of each line is the README's, run through the installed console scripts with the working directory at
the repository root (where ``python -m`` and Ray workers put it first on ``sys.path``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def readme_command(program: str, must_contain: str) -> list[str]:
    """The first README code line running ``program`` that contains ``must_contain`` (after any ``&&``)."""
    blocks, current = [], None
    for ln in README.splitlines():
        if ln.startswith("```"):
            if current is None:
                current = [] if ln.strip() in ("```", "```bash") else False  # only plain and bash blocks
            else:
                if current is not False:
                    blocks.append("\n".join(current))
                current = None
        elif isinstance(current, list):
            current.append(ln)
    for block in blocks:
        line = block.replace("\\\n", " ")
        for part in (p.strip() for chunk in line.splitlines() for p in chunk.split("&&")):
            if part.startswith(program + " ") and must_contain in part:
                return shlex.split(part)
    raise AssertionError(f"README.md has no `{program} ... {must_contain}` command")


def with_out(argv: list[str], out: Path) -> list[str]:
    i = argv.index("--out")
    return [*argv[:i + 1], str(out), *argv[i + 2:]]


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():  # an environment without console scripts next to the interpreter
        found = shutil.which(name)
        assert found, f"{name} is not installed; run the README's install line"
        return found
    return str(path)


def test_readme_main_edit_from_the_repository_root(tmp_path):
    argv = readme_command("fastdm-edit", "red_circle_right.gif")
    out = tmp_path / "red_to_blue.mp4"
    p = subprocess.run([script("fastdm-edit"), *with_out(argv, out)[1:], "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("red_to_blue.mp4", "red_to_blue_mask.mp4", "red_to_blue_compare.mp4", "red_to_blue.json"):
        assert (tmp_path / f).is_file(), f
    assert json.loads((tmp_path / "red_to_blue.json").read_text())["steps_run"] >= 1


def test_readme_batch_example_from_the_repository_root(tmp_path):
    pytest.importorskip("ray", reason="the README installs Ray with the [batch] extra; the test extra has it")
    argv = readme_command("fastdm-batch", "examples/shapes_jobs.jsonl")
    out = tmp_path / "runs"
    p = subprocess.run([script("fastdm-batch"), *with_out(argv, out)[1:], "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 3, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])  # 3: the batch ran, one job failed
    recs = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines() if ln.strip()]
    by_status = {s: sorted(r["line"] for r in recs if r["status"] == s) for s in ("done", "failed")}
    assert len(by_status["done"]) == 3 and len(by_status["failed"]) == 1, recs
    (bad,) = [r for r in recs if r["status"] == "failed"]
    assert "corrupt_clip.mp4" in bad["input"] and "worker" not in bad["error"], bad
    assert "\x1b" not in (out / "results.jsonl").read_text()


def test_readme_app_starts_from_the_repository_root(tmp_path):
    pytest.importorskip("gradio", reason="the README installs Gradio with the [app] extra; the test extra has it")
    from .test_app import start_app, stop_app

    assert "`fastdm-app` and open http://127.0.0.1:7860" in README
    proc, url = start_app(tmp_path, command=[script("fastdm-app")])  # (its working directory: the repository root)
    assert proc.poll() is None and url.startswith("http://127.0.0.1:")
    stop_app(proc)
