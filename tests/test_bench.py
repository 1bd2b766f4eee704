"""The benchmark harnesses run end to end at tiny sizes and write their results files."""

import json
import subprocess
import sys

from fastdm.bench.harness import count_step_flops, main


def test_fastdm_bench_tiny_naive_vs_fast(tmp_path, capsys):
    assert main(["--preset", "tiny", "--frames", "2", "--modes", "naive,fast", "--steps", "1", "--out", str(tmp_path),
                 "--peak-tflops", "1"]) == 0
    (j,) = tmp_path.glob("edit-*.json")
    data = json.loads(j.read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    for mode in ("naive", "fast"):
        r = rows[mode]
        assert r["median_step_s"] > 0 and r["peak_bytes"] > 0 and r["flops_per_step"] > 0, r
        assert r["roofline_step_s"] == r["flops_per_step"] / 1e12
    assert (tmp_path / j.name.replace(".json", ".md")).read_text().count("| tiny |") == 2
    # the memory plan, measured by the allocator: naive keeps all four evaluations' graphs until the
    # backward; fast keeps only the grad branch's prefix (allocation sizes are deterministic)
    naive, fast = rows["naive"]["tensor_working_peak_bytes"], rows["fast"]["tensor_working_peak_bytes"]
    assert naive > 0 and fast > 0
    assert naive > 1.5 * fast, (naive, fast)


def test_flops_only_counts_on_meta():
    assert count_step_flops("tiny", 2, "fast") > 0


def test_bench_ssm_one_case():
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_ssm", "--one", "spatial,torch,64,8,2", "--repeats", "1"],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["median_s"] > 0 and r["extra_peak_bytes"] >= 0
