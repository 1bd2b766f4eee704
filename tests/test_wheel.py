"""The wheel and the sdist, built by the standard front end (``python -m build``) from a copy of the tree, install
into a fresh virtual environment (not editable) and work there: ``fastdm-edit`` edits a bundled clip,
``fastdm-bench --help``, ``import fastdm.kernels``; a wheel built from the sdist holds the same files.

The fresh environment reuses this one's installed dependencies through a ``.pth`` line (no download of torch
again) but not its editable fastdm: a ``.pth`` line adds a folder to ``sys.path`` without running that folder's
own ``.pth`` files, so the editable finder stays out and fastdm comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p


def _copy_tree(dest: Path) -> Path:
    """The files git tracks and the untracked ones it does not ignore (what a clean clone plus this change
    holds), links kept as links."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src, dst = ROOT / rel, dest / rel
        if not os.path.lexists(src):
            continue  # (deleted in the working tree)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="the test extra installs `build`")
    root = tmp_path_factory.mktemp("dist")
    src = _copy_tree(root / "src")
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", root / "out", src])
    (wheel,) = (root / "out").glob("fastdm-*.whl")
    (sdist,) = (root / "out").glob("fastdm-*.tar.gz")
    return root, wheel, sdist


def test_the_wheel_holds_the_package_its_kernels_models_and_configs(dist):
    _, wheel, _ = dist
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("fastdm/kernels/dispatch.py", "fastdm/kernels/ssm_spatial.py", "fastdm/kernels/aot.py", "fastdm/comfy/nodes.py",
              "fastdm/backbone/ltx.py", "fastdm/backbone/cogvideox.py", "fastdm/version.py",
              "fastdm/assets/clips/red_circle_right.gif", "fastdm/assets/models/shapes/model_index.json",
              "fastdm/bench/configs/wan2.2-t2v-a14b/transformer.json"):
        assert f in names, f
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)  # no top-level `kernels`
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt")) for n in names)


def test_a_wheel_built_from_the_sdist_holds_the_same_files(dist, tmp_path):
    _, wheel, sdist = dist
    with tarfile.open(sdist) as t:
        assert any(m.name.endswith("fastdm/kernels/dispatch.py") for m in t.getmembers())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, sdist])
    (again,) = tmp_path.glob("fastdm-*.whl")
    names = lambda w: sorted(n for n in zipfile.ZipFile(w).namelist() if not n.endswith("RECORD"))  # noqa: E731
    assert names(again) == names(wheel)


def test_the_wheel_installs_into_a_fresh_environment_and_edits(dist, tmp_path):
    _, wheel, _ = dist
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "deps-of-the-test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel])
    work = tmp_path / "work"  # (not the checkout: nothing of the repository is on the path)
    work.mkdir()
    where = json.loads(_run([py, "-c", "import json, fastdm, fastdm.kernels.dispatch as d; "
                                       "print(json.dumps([fastdm.__file__, d.__file__, fastdm.__version__]))"], cwd=work).stdout)
    assert all(p.startswith(str(venv)) for p in where[:2]), where
    clip = Path(where[0]).parent / "assets" / "clips" / "red_circle_right.gif"
    out = work / "edit.mp4"
    _run([venv / "bin" / "fastdm-edit", clip, "--source-prompt", "a red circle moving right", "--target-prompt",
          "a blue circle moving right", "--steps", "2", "--mask", "none", "--out", out, "--quiet"], cwd=work)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["steps_run"] == 2
    assert "wan2.2-t2v-a14b" in _run([venv / "bin" / "fastdm-bench", "--help"], cwd=work).stdout
    assert _run([venv / "bin" / "fastdm-edit", "--version"], cwd=work).stdout.strip() == f"fastdm-edit {where[2]}"
