"""A process started in the repository root sees the packages users have, not the repository's folders.

`python -m ...`, `python -m pytest` and Ray workers put the working directory first on ``sys.path``.
The repository keeps its Triton kernels in the top-level folder ``kernels/`` (reached as
``fastdm.kernels``); Hugging Face's ``kernels`` (a dependency of transformers >= 5, imported by
diffusers) has the same top-level name. ``kernels/`` is a namespace folder (no ``__init__.py``), and an
installed regular package beats a namespace folder that comes earlier on the path, so the installed one
wins. These tests start fresh interpreters in the repository root, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *, cwd: Path = ROOT, extra_path: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after '' (the working directory) on sys.path, like site-packages
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _stand_in_kernels(site: Path) -> Path:
    """A distribution named ``kernels`` (package + dist-info), as pip would install it."""
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("STAND_IN = 'installed'\nclass CUDAProperties:\n    pass\n")
    info = site / "kernels-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    (info / "RECORD").write_text("")
    return site


def test_repository_kernels_folder_is_not_a_regular_package():
    # an __init__.py here would make `import kernels` in the repository root take this folder again
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the folder shadow Hugging Face's `kernels`; keep the API in kernels/dispatch.py"
    assert (ROOT / "fastdm" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_import_kernels_in_the_repository_root_gives_the_installed_distribution(tmp_path):
    site = _stand_in_kernels(tmp_path / "site")
    p = _python("""
        import sys, json, importlib.metadata as md
        import kernels, fastdm.kernels.dispatch as d
        print(json.dumps({"path0": sys.path[0], "kernels": kernels.__file__, "stand_in": getattr(kernels, "STAND_IN", None),
                          "version": md.version("kernels"), "ours": d.__name__}))
    """, extra_path=site)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["path0"] == ""  # the working directory (the repository root) does come first
    assert got["stand_in"] == "installed" and Path(got["kernels"]).parent == site / "kernels"
    assert got["version"] == "0.0.1" and got["ours"] == "fastdm.kernels.dispatch"


def test_diffusers_video_models_import_in_the_repository_root():
    """With whatever `kernels` this environment has (the pinned set installs Hugging Face's)."""
    p = _python("""
        import sys
        from diffusers import UNet3DConditionModel, WanTransformer3DModel  # noqa: F401
        import diffusers.loaders.peft  # noqa: F401  (what imported `kernels` and failed)
        import fastdm.kernels.dispatch, fastdm.losses.ssm  # noqa: F401
        k = sys.modules.get("kernels")
        print(getattr(k, "__file__", None) if k is not None else "not imported")
    """)
    assert p.returncode == 0, p.stderr[-3000:]
    where = p.stdout.strip().splitlines()[-1]
    assert where == "not imported" or where == "None" or not where.startswith(str(ROOT / "kernels"))


def test_this_test_process_did_not_take_the_repository_folder_for_kernels():
    k = sys.modules.get("kernels")
    if k is not None and getattr(k, "__file__", None):
        assert not str(k.__file__).startswith(str(ROOT / "kernels"))


def test_python_m_cli_runs_in_the_repository_root(tmp_path):
    out = tmp_path / "o.mp4"
    p = subprocess.run([sys.executable, "-m", "fastdm.cli", "fastdm/assets/clips/red_circle_right.gif",
                        "--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right",
                        "--steps", "1", "--mask", "none", "--frames", "4", "--out", str(out), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["steps_run"] == 1
