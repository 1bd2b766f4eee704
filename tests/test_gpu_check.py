"""tools/gpu_check.sh without a GPU: its syntax, the dry-run plan (parsed and checked against the steps
the script really runs), and the orchestration (summary, per-step timeouts, the budget, partial results
kept) with a stub interpreter standing in for python."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")

STEP = re.compile(r"^step (\S+) \(timeout (\d+)s, needs (\S+), by (\d+)s, worst case: ([^)]*)\): (.*)$")


def run(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def plan(env=None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    p = run("--dry-run", env=env)
    steps = []
    for line in p.stdout.splitlines():
        m = STEP.match(line)
        if m:
            steps.append({"name": m[1], "timeout": int(m[2]), "needs": m[3], "by": int(m[4]), "worst": m[5], "cmd": m[6]})
    return p, steps


def summary_rows(summary: str) -> dict[str, str]:
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("step", "---"):
            rows[cells[0]] = cells[1]
    return rows


def stub_python(tmp_path: Path, body: str) -> Path:
    stub = tmp_path / "python3"
    stub.write_text("#!/usr/bin/env bash\n" + body)
    stub.chmod(0o755)
    return stub


def wheels(tmp_path: Path) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    (d / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    return d


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_plan_fits_one_call_in_priority_order(tmp_path):
    p, steps = plan({"OUT": str(tmp_path / "out"), "FASTDM_WHEELS": str(wheels(tmp_path))})
    assert p.returncode == 0, p.stdout + p.stderr
    names = [s["name"] for s in steps]
    # the most valuable figures first: kernels, the loss benchmark, fast/lean/plain at 16 and 24 frames
    order = ["kernel-tests", "bench-ssm", "bench-16", "bench-24", "bench-compile-16", "bench-naive-16"]
    assert [n for n in names if n in order] == order
    by = {s["name"]: s for s in steps}
    budget = int(re.search(r"Budget (\d+)s", p.stdout)[1])
    reserve = int(re.search(r"reserve (\d+)s", p.stdout)[1])
    assert budget <= 540
    # everything up to bench-24 fits even when every step runs to its timeout
    assert by["bench-24"]["by"] + reserve <= budget
    assert all(by[n]["worst"] == "fits" for n in names[: names.index("bench-24") + 1])
    assert "TRITON_INTERPRET=0" in by["kernel-tests"]["cmd"] and "-rA" in by["kernel-tests"]["cmd"]
    assert "-n 4" in by["kernel-tests"]["cmd"] and "tests/test_kernels.py" in by["kernel-tests"]["cmd"]
    assert "--device cuda" in by["bench-ssm"]["cmd"] and "triton-autotune" in by["bench-ssm"]["cmd"]
    assert "--cuda-profile" in by["bench-16"]["cmd"]
    for n, frames in (("bench-16", 16), ("bench-24", 24)):
        assert f"--frames {frames} --modes fast,lean,plain" in by[n]["cmd"]
        assert "--device cuda --dtype bf16" in by[n]["cmd"] and "--no-flops" in by[n]["cmd"]
        assert by[n]["needs"] == "diffusers"
    assert "--modes fast:compile " in by["bench-compile-16"]["cmd"] and "--modes naive" in by["bench-naive-16"]["cmd"]
    assert by["kernel-tests"]["needs"] == "-" and by["bench-ssm"]["needs"] == "-"
    # the device call to make: what to carry, the time limit to ask for (budget + margin, within 600 s)
    m = re.search(r'^device call: .*carry \["(.+)"\], timeout_s (\d+)$', p.stdout, re.M)
    assert m and m[1].endswith("wheels") and budget < int(m[2]) <= 600
    # payload: parsed, well under the 64 MiB a call carries
    m = re.search(r"^payload: (\d+) MiB \(working tree (\d+) MiB", p.stdout, re.M)
    assert m and int(m[1]) <= 48, p.stdout
    assert "skip bench fast:trt" in p.stdout and "TensorRT unverified" in p.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    text = SCRIPT.read_text()
    assert "second call" not in text and not re.search(r"--only\b(?!-)", text)  # one call, no follow-up


def test_dry_run_fails_when_the_wheel_is_missing(tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    p, steps = plan({"FASTDM_WHEELS": str(empty)})
    assert p.returncode == 1
    assert "wheels: MISSING diffusers==0.42.1" in p.stdout and "--fetch-wheels" in p.stdout
    assert steps  # the plan is still printed


def test_modes_are_the_harness_modes():
    """Every plan the script benchmarks exists in the harness (PLANS), so no case errors by name."""
    from fastdm.driver.plan import PLANS

    _, steps = plan()
    modes = {m for s in steps for m in re.findall(r"--modes (\S+)", s["cmd"]) for m in m.split(",")}
    assert modes and all(m.removesuffix("+grad").partition(":")[0] in PLANS for m in modes), modes


def test_stub_run_follows_the_plan_and_keeps_finished_rows(tmp_path):
    """A stub stands in for python3: the kernel tests fail, the 24-frame benchmark writes one finished
    row and then hangs; every other step passes at once. The summary lists the steps of the dry run in
    its order, marks the failure and the timeout, and pastes the 24-frame table with its finished row."""
    stub = stub_python(tmp_path, r'''
args="$*"
out=$(echo "$args" | sed -n 's/.*--out \([^ ]*\).*/\1/p')
case "$args" in
  *"-m pytest"*) echo "PASSED tests/test_kernels.py::a"; echo "FAILED tests/test_kernels.py::b - boom"; exit 1 ;;
  *"bench_ssm"*) mkdir -p "$out"; printf '| loss | backend |\n|---|---|\n| spatial | triton |\n' > "$out/ssm-stub.md" ;;
  *"--frames 24"*) mkdir -p "$out"; printf '| mode | s |\n|---|---|\n| fast | 0.21 |\n' > "$out/edit-stub.md"; sleep 60 ;;
  *"--frames 16"*) mkdir -p "$out"; printf '| mode | s |\n|---|---|\n| fast | 0.14 |\n' > "$out/edit-stub.md" ;;
  *"import diffusers"*) exit 0 ;;
esac
echo "Name: stub $args"
''')
    out = tmp_path / "out"
    env = {"OUT": str(out), "PYTHON": str(stub), "FASTDM_WHEELS": str(wheels(tmp_path)), "TMPDIR": str(tmp_path),
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    _, steps = plan(env)
    # the budget leaves the hanging step a few seconds
    p = run(env={**env, "GPU_CHECK_BUDGET": "14", "GPU_CHECK_RESERVE": "2", "GPU_CHECK_MIN_STEP": "1"}, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = (out / "summary.md").read_text()
    rows = summary_rows(summary)
    assert list(rows) == [s["name"] for s in steps], summary  # the same steps, in the same order
    assert rows["install"] == "ok" and rows["bench-16"] == "ok"
    assert rows["kernel-tests"].startswith("failed (exit 1)")
    assert rows["bench-24"].startswith("TIMED OUT")
    assert "1 passed, 1 failed" in summary and "FAILED tests/test_kernels.py::b" in summary
    assert "| fast | 0.21 |" in summary and "| fast | 0.14 |" in summary and "| spatial | triton |" in summary
    assert "## bench-24/edit-stub.md" in summary
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("bench-24.log") for n in names) and any(n.endswith("bench-24/edit-stub.md") for n in names)
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files


def test_without_wheels_fastdm_is_installed_and_kernel_steps_run(tmp_path):
    """No wheels carried: fastdm is still installed, the kernel steps run, the diffusers steps say why not."""
    stub = stub_python(tmp_path, 'case "$*" in *"import diffusers"*) exit 1 ;; esac\necho "stub $*" >> "$TMPDIR/calls"\n')
    out = tmp_path / "out"
    empty = tmp_path / "none"
    empty.mkdir()
    p = run(env={"OUT": str(out), "PYTHON": str(stub), "FASTDM_WHEELS": str(empty), "TMPDIR": str(tmp_path),
                 "GPU_CHECK_BUDGET": "60"}, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = summary_rows((out / "summary.md").read_text())
    calls = (tmp_path / "calls").read_text()
    assert "-m pip install -q --no-index --no-deps --no-build-isolation -e ." in calls
    assert rows["install"] == "ok" and rows["kernel-tests"] == "ok" and rows["bench-ssm"] == "ok"
    for n in ("bench-16", "bench-24", "bench-compile-16", "bench-naive-16"):
        assert rows[n].startswith("skipped: no diffusers"), rows
