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


def _fake_case(result_s: float):
    return {"engine_build_s": 0.0, "median_step_s": result_s, "warmup_step_s": result_s, "setup_s": 1.0, "decode_s": 0.1,
            "e2e_200_projected_s": 200 * result_s, "peak_bytes": 2**30, "working_peak_bytes": 2**29,
            "tensor_working_peak_bytes": None, "params": 1}


def test_harness_keeps_every_finished_case_when_cut(tmp_path, monkeypatch):
    """The results files are written after each case: a run killed in its second case keeps the first."""
    import fastdm.bench.harness as harness

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the step's timeout kills the harness here
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(_fake_case(0.25)) + "\n", stderr="")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    try:
        main(["--preset", "tiny", "--frames", "2", "--modes", "fast,lean", "--no-flops", "--peak-tflops", "1",
              "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    (j,) = tmp_path.glob("edit-tiny-*.json")  # named after the preset
    rows = json.loads(j.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fast"] and rows[0]["median_step_s"] == 0.25
    assert "| tiny | 2 | fast | 0.250 |" in j.with_suffix(".md").read_text()


def test_no_flops_takes_the_committed_meta_count(tmp_path, monkeypatch):
    """--no-flops (device runs) counts nothing and fills FLOPs per (preset, frames, plan) from the committed
    meta-device counts; an engine mode takes its plan's count."""
    import fastdm.bench.harness as harness

    committed = harness.committed_flops("bf16")
    want, source = committed[("zeroscope-576w", 16, "fast")]
    assert want > 1e13 and "flops" in source
    monkeypatch.setattr(harness, "count_step_flops", lambda *a, **k: (_ for _ in ()).throw(AssertionError("counted")))
    monkeypatch.setattr(harness.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout=json.dumps(_fake_case(0.5)), stderr=""))
    assert main(["--preset", "zeroscope-576w", "--frames", "16", "--modes", "fast:compile+grad,lean", "--no-flops",
                 "--peak-tflops", "100", "--out", str(tmp_path)]) == 0
    rows = {r["mode"]: r for r in json.loads(next(tmp_path.glob("edit-zeroscope-576w-*.json")).read_text())["rows"]}
    assert rows["fast:compile+grad"]["flops_per_step"] == want and rows["fast:compile+grad"]["flops_source"] == source
    assert rows["lean"]["flops_per_step"] == committed[("zeroscope-576w", 16, "lean")][0] != want
    assert rows["lean"]["roofline_step_s"] == rows["lean"]["flops_per_step"] / 100e12


def test_bench_ssm_writes_each_case_as_it_finishes(tmp_path, monkeypatch):
    import benchmarks.bench_ssm as bench_ssm

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"median_s": 0.01 * len(calls), "extra_peak_bytes": 2**20}),
                                           stderr="")

    monkeypatch.setattr(bench_ssm.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_ssm", "--quick", "--backends", "naive,torch", "--repeats", "1", "--out", str(tmp_path)])
    try:
        bench_ssm.main()
    except KeyboardInterrupt:
        pass
    (j,) = tmp_path.glob("ssm-*.json")
    rows = json.loads(j.read_text())["rows"]
    assert [(r["loss"], r["backend"]) for r in rows] == [("spatial", "naive"), ("spatial", "torch")]
    assert "| spatial | 2880 | 320 | 16 | torch | 0.0200 |" in j.with_suffix(".md").read_text()


def test_batch_report_is_written_from_the_runs_own_files(tmp_path, monkeypatch):
    import benchmarks.common as common
    from benchmarks import batch_report

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    run = tmp_path / "runs"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "machine": "Some CPU, 2 cores", "machine_name": "cpu-some-2core-x86_64", "jobs": 2, "done": 1, "failed": 1,
        "this_run": {"done": 1, "failed": 1, "retried": 1, "skipped": 0, "wall_s": 10.0, "workers": 2, "edits_per_hour": 360.0}}))
    (run / "results.jsonl").write_text(
        json.dumps({"line": 3, "status": "done", "attempts": 2, "deaths": 1, "resumed_from_step": 4, "steps_run": 8,
                    "evaluations": {"forward": 34, "backward": 8}, "timings": {"job_s": 5.5}, "output": "a.mp4"}) + "\n"
        + json.dumps({"line": 2, "status": "failed", "attempts": 0, "error": "input video 'x' could not be read"}) + "\n"
        + '{"line": 4, "sta')  # a torn last line is skipped
    assert batch_report.main([str(run), "--name", "t"]) == 0
    (md,) = (tmp_path / "results").glob("batch-t-cpu-some-2core-x86_64.md")  # named after the run's machine
    text = md.read_text()
    assert "Machine: Some CPU, 2 cores." in text  # the run's own machine, not this process's
    assert "| 3 | done | 2 | 1 | 4 | 8 | 34 | 8 | 5.5 | a.mp4 |" in text
    assert "| 2 | failed |" in text and "could not be read" in text and "360.0 edits/hour" in text


def test_cuda_profile_sorts_kernels_by_kind_and_reaches_the_table(tmp_path, monkeypatch):
    """--cuda-profile: device time by kind of kernel and the top kernels (events as the profiler's key_averages
    gives them), passed to the case subprocess and written under the table."""
    from types import SimpleNamespace

    import fastdm.bench.harness as harness

    ev = lambda key, n, us: SimpleNamespace(key=key, count=n, self_device_time_total=us)
    prof = harness.kernel_profile([ev("sm90_xmma_gemm_bf16", 40, 120_000.0), ev("flash_fwd_kernel", 30, 60_000.0),
                                   ev("_gram3_kernel", 2, 9_000.0), ev("vectorized_elementwise_kernel", 500, 11_000.0),
                                   ev("sm90_xmma_fprop_implicit_gemm_bf16", 4, 2_000.0), ev("aten::mm", 40, 0.0)], top=2)
    assert prof["step_device_ms"] == 202.0
    assert list(prof["by_kind_ms"]) == ["matmul", "attention", "other", "ssm loss (triton)", "convolution"]
    assert [t["kernel"] for t in prof["top"]] == ["sm90_xmma_gemm_bf16", "flash_fwd_kernel"]
    # fastdm's kernels are read from fastdm/kernels, not listed by hand: each one lands under the loss's kind
    names = harness.triton_kernel_names()
    assert {"_gram3_kernel", "_grad_gram_kernel", "_frame_sums_kernel", "_pair_stats_kernel", "_row_fixup_kernel"} <= set(names)
    kinds = harness.kernel_profile([ev(n, 1, 1_000.0) for n in names])["by_kind_ms"]
    assert list(kinds) == ["ssm loss (triton)"] and kinds["ssm loss (triton)"] == len(names)

    cmds = []

    def fake_run(cmd, **kw):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({**_fake_case(0.25), "cuda_profile": prof}) + "\n", stderr="")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    main(["--preset", "tiny", "--frames", "2", "--modes", "fast", "--no-flops", "--peak-tflops", "1", "--cuda-profile",
          "--out", str(tmp_path)])
    assert "--cuda-profile" in cmds[0]
    md = next(tmp_path.glob("edit-tiny-*.md")).read_text()
    assert "| matmul | 120.0 | 59% |" in md and "| `flash_fwd_kernel` | 30 | 60.00 |" in md


def test_bench_ssm_records_what_autotune_chose():
    """triton-autotune rows carry the autotuner's choice per kernel into the table; on the CPU (interpreter) the
    backend runs untuned, so nothing is claimed there."""
    import benchmarks.bench_ssm as bench_ssm

    row = {"loss": "spatial", "backend": "triton-autotune", "N": 2880, "C": 320, "F": 16, "median_s": 0.002,
           "extra_peak_bytes": 2**20, "autotuned": {"gram3": "BN: 32, BC: 64, num_warps: 8, num_stages: 2"}}
    md = bench_ssm.markdown([row], {"machine": "m", "machine_description": "d", "repeats": 3})
    assert "triton-autotune chose" in md and "gram3: BN: 32, BC: 64, num_warps: 8, num_stages: 2" in md
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_ssm", "--one", "spatial,triton-autotune,40,8,2", "--repeats", "1"],
                         capture_output=True, text=True, check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["median_s"] > 0 and r["autotuned"] == {}


def test_fp16_grad_range_writes_its_table(tmp_path, monkeypatch):
    """benchmarks/fp16_grad_range.py at a small size: the float64 gradients' largest and median entries and the share
    under fp16's smallest subnormal (near the source, all of it)."""
    import benchmarks.fp16_grad_range as fgr

    monkeypatch.setattr(fgr, "SIZES", [(40, 8)])
    assert fgr.main(["--frames", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("fp16-grad-range-*.json")).read_text())["rows"]
    assert len(rows) == 6 and all(r["max"] >= r["median"] > 0 for r in rows)
    by = {(r["keys"], r["loss_kind"]): r for r in rows}
    for loss in ("spatial", "temporal"):  # the closer to the source, the smaller, and more of it under fp16's range
        far, near = by[("unrelated", loss)], by[("source + 1e-05 noise", loss)]
        assert near["max"] < 1e-3 * far["max"] and near["below_fp16_subnormal"] >= far["below_fp16_subnormal"]
    assert "| 40 | 8 | unrelated | spatial |" in next(tmp_path.glob("fp16-grad-range-*.md")).read_text()
