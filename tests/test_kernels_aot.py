"""AOT compile of every Triton kernel for sm_80 / sm_86 / sm_89 / sm_90a, on the CPU.

Runs ``python -m fastdm.kernels.aot`` in a subprocess (Triton must not be in interpreter mode
there): every kernel at the configurations the dispatch launches for all ZeroScope key sizes,
16 frames, fp32/fp16/bf16. Fails on a compile error, shared memory above a target's per-block
limit (sm_80 166912 B, sm_86/sm_89 101376 B, sm_90a 232448 B) or register spills above
``fastdm.kernels.aot.SPILL_BUDGET_BYTES`` (0). Writes its table to a temporary folder (the test run
leaves the tree unchanged); ``FASTDM_AOT_RESULTS=1`` writes benchmarks/results/kernels-aot.{md,json}, the
committed table, instead (or run ``python -m fastdm.kernels.aot --out benchmarks/results/kernels-aot``).
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _missing_backend() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None:
        return "triton's CUDA backend (triton.backends.nvidia) is absent"
    ptxas = pathlib.Path(spec.submodule_search_locations[0]) / "bin" / "ptxas"
    if not ptxas.exists() and not shutil.which("ptxas"):
        return f"ptxas is absent ({ptxas} not found, none on PATH)"
    return None


@pytest.mark.skipif(_missing_backend() is not None, reason=str(_missing_backend()))
def test_aot_compile_all_targets(tmp_path):
    out = ROOT / "benchmarks" / "results" / "kernels-aot" if os.environ.get("FASTDM_AOT_RESULTS") else tmp_path / "kernels-aot"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "fastdm.kernels.aot", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    md = out.with_suffix(".md").read_text()
    assert "Failures: none" in md
    for target in ("sm_80", "sm_86", "sm_89", "sm_90a"):
        assert f"| {target} |" in md
