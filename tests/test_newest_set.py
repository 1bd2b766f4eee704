"""The kernel, backbone and pipeline tests on the newest set, besides the pinned one this suite runs on.

``python tools/newest_env.py`` (the README's test command runs it) builds ``.newest/venv`` at the versions in
``.ci/constraints-newest.txt``: torch 2.14.1 with the Triton it pins, the newest diffusers, transformers and
accelerate; and the newest Triton apart in ``.newest/triton-newest``. These tests run a subset of this suite there,
in a fresh interpreter: once as installed, once with the newest Triton in front on ``PYTHONPATH`` (the kernel and
loss tests, in its interpreter). ``$FASTDM_NEWEST`` points elsewhere.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEWEST = Path(os.environ.get("FASTDM_NEWEST") or ROOT / ".newest")
CONSTRAINTS = ROOT / ".ci" / "constraints-newest.txt"
KERNELS = ["tests/test_kernels.py", "tests/test_losses.py"]
SUBSET = KERNELS + ["tests/test_taps.py", "tests/test_loader.py", "tests/test_wan.py", "tests/test_wan22.py", "tests/test_ltx.py",
                    "tests/test_cogvideox.py", "tests/test_hunyuan.py", "tests/test_pipeline.py"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.startswith("# newest-triton:"):
            pins["newest-triton"] = line.split("==")[1].strip()
        elif "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _python() -> Path:
    py = NEWEST / "venv" / "bin" / "python"
    if not py.exists():
        pytest.fail(f"no newest-set environment at {NEWEST}; build it with `python tools/newest_env.py` (the README's test "
                    "command does)")
    return py


def _env(newest_triton: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if newest_triton:
        env["PYTHONPATH"] = str(NEWEST / "triton-newest")
    return env


def _versions(newest_triton: bool) -> dict[str, str]:
    code = "import torch, triton, diffusers, transformers; print(torch.__version__, triton.__version__, diffusers.__version__, " \
           "transformers.__version__)"
    out = subprocess.run([str(_python()), "-c", code], cwd=ROOT, env=_env(newest_triton), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(zip(("torch", "triton", "diffusers", "transformers"), out.stdout.split()))


def _pytest(files: list[str], newest_triton: bool) -> str:
    p = subprocess.run([str(_python()), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files], cwd=ROOT,
                       env=_env(newest_triton), capture_output=True, text=True, timeout=2400)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    return p.stdout


def test_the_newest_set_is_what_the_pins_say_and_newer_than_the_pinned_one():
    pins, have = _pins(), _versions(newest_triton=False)
    assert have["torch"].split("+")[0] == pins["torch"] and have["triton"] == pins["triton"]
    assert (have["diffusers"], have["transformers"]) == (pins["diffusers"], pins["transformers"])
    assert _versions(newest_triton=True)["triton"] == pins["newest-triton"] != pins["triton"]


def test_kernels_backbones_and_pipeline_on_the_newest_torch():
    out = _pytest(SUBSET, newest_triton=False)
    assert " passed" in out and " failed" not in out


def test_kernels_under_the_newest_tritons_interpreter():
    out = _pytest(KERNELS, newest_triton=True)
    assert " passed" in out and " failed" not in out
