"""tools/gpu_check.sh without a GPU: its syntax, the dry-run plan, and the orchestration (summary,
per-step timeouts, the budget, the results folder) with a stub interpreter standing in for python."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    p = run("--dry-run", env={"OUT": str(tmp_path / "out")})
    assert p.returncode in (0, 1), p.stderr  # 1: the working tree is over the carry limit right now
    out = p.stdout
    for step in ("env", "install", "versions", "kernel-tests", "bench-ssm", "bench-eager-24", "bench-eager-16",
                 "bench-compile-16", "bench-compile-24", "memory-compare"):
        assert f"step {step} " in out, step
    assert "TRITON_INTERPRET=0" in out and "tests/test_kernels.py" in out
    assert "--modes naive,plain,fast,lean" in out and "fast:compile+grad,fast:cudagraphs+grad" in out
    assert "--device cuda --dtype bf16" in out
    assert "skip bench fast:trt" in out and "TensorRT unverified" in out
    assert "payload:" in out and "wheels:" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_modes_are_the_harness_modes():
    """Every plan the script benchmarks exists in the harness (PLANS), so no case errors by name."""
    from fastdm.driver.plan import PLANS

    text = SCRIPT.read_text()
    for plan in ("naive", "plain", "fast", "lean"):
        assert plan in PLANS
    assert "--modes naive,plain,fast,lean" in text


def test_orchestration_with_a_stub_python(tmp_path):
    """A stub stands in for python3: every step 'passes' at once except the kernel tests, which
    hang; the budget leaves them a few seconds, they are cut, later steps are skipped out of time,
    and the summary, the log and the details archive are all in $OUT."""
    stub = tmp_path / "python3"
    stub.write_text('#!/usr/bin/env bash\ncase "$*" in *"-m pytest"*) sleep 60 ;; esac\necho "Name: stub $*"\n')
    stub.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    p = run(env={"OUT": str(out), "PYTHON": str(stub), "FASTDM_WHEELS": str(wheels), "GPU_CHECK_BUDGET": "6",
                 "GPU_CHECK_RESERVE": "0", "GPU_CHECK_MIN_STEP": "2", "TMPDIR": str(tmp_path)}, timeout=60)
    assert p.returncode == 0, p.stderr
    summary = (out / "summary.md").read_text()
    assert "| env |" in summary and "| install | ok |" in summary and "| versions | ok |" in summary, summary
    assert "| kernel-tests | TIMED OUT" in summary
    assert "skipped: out of time" in summary  # the benches after it
    assert "TensorRT unverified" in summary
    assert (out / "gpu-check.log").exists()
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("kernel-tests.log") for n in names)
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
