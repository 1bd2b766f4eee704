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


@pytest.mark.skipif(_missing_backend() is not None, reason=str(_missing_backend()))
def test_a_candidate_configuration_is_reported_also_from_a_warm_cache(tmp_path):
    """--config compiles a candidate instead of the dispatch's choice; run twice on one Triton cache, the second
    run still reads ptxas's register and spill report (a cached kernel used to skip ptxas: spills read as 0)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    rows = []
    for i in range(2):
        out = tmp_path / f"cand{i}"
        subprocess.run([sys.executable, "-m", "fastdm.kernels.aot", "--targets", "86", "--dtypes", "fp32", "--config",
                        "gram3:BN=32,BC=64,w8,s2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)  # (exit 1: the candidate spills at sm_86, which is what it reports)
        import json

        data = json.loads(out.with_suffix(".json").read_text())
        assert data["meta"]["configs_overridden"] == {"gram3": "{'BN': 32, 'BC': 64}, w8, s2"}
        rows.append([r for r in data["rows"] if r["kernel"] == "gram3"])
        assert rows[-1] and all(r["meta"]["BN"] == 32 and r["meta"]["BC"] == 64 and r["regs"] for r in rows[-1])
    assert [r["spill_stores"] for r in rows[1]] == [r["spill_stores"] for r in rows[0]] and rows[0][0]["spill_stores"] > 0
    assert any("gram3 sm_86 fp32" in f and "spills" in f for f in data["failures"])


def test_candidate_configuration_syntax():
    from fastdm.kernels.aot import parse_config

    kernel, cfg = parse_config("gram3:BN=32,BC=64,w8,s3")
    assert kernel == "gram3" and cfg.meta == {"BN": 32, "BC": 64} and (cfg.num_warps, cfg.num_stages) == (8, 3)
    for bad in ("gram3", "gram3:w8", "gram3:BN=32,x9"):
        with pytest.raises(ValueError):
            parse_config(bad)
