"""`fastdm-batch` on a local Ray instance (2 CPU workers, the bundled model at 3 steps of 2 frames).

One Ray instance serves the module. The main test runs a manifest of good jobs and one corrupt
input, kills the worker of a job mid-run (the job is retried from its checkpoint and finishes),
then runs the manifest again (nothing happens). Its time is mostly Ray's start and the workers'
(each imports torch and diffusers and loads the model: the first two, then the one that replaces
the killed worker), so its edits are as small as still tests them: 3 steps with a checkpoint after
each (the kill lands with steps left) and 2 frames (the fewest that give T-SSM a pair). The others
need no Ray: manifest errors listed with line numbers before any work, --strict, the committed
example manifest, torn results lines, and the message without Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fastdm
from fastdm.cli import main as edit_main
from fastdm.service import batch
from fastdm.service.batch import (
    BatchRunner,
    append_result,
    main,
    read_manifest,
    read_results,
)

ROOT = Path(__file__).resolve().parent.parent
CLIPS = Path(fastdm.__file__).parent / "assets" / "clips"
GOOD = [("red_circle_right.gif", "a red circle moving right", "a blue circle moving right"),
        ("green_square_down.gif", "a green square moving down", "a white square moving down"),
        ("blue_triangle_left.gif", "a blue triangle moving left", "a yellow triangle moving left")]
STEPS = 6  # (a checkpoint exists for 5 of the 6 steps: time for the test to catch a job mid-run on a busy machine)
FRAMES = 2


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _write_manifest(folder: Path, corrupt: Path) -> Path:
    lines = [{"input": str(CLIPS / clip), "source_prompt": s, "target_prompt": t, "steps": STEPS, "frames": FRAMES, "seed": i}
             for i, (clip, s, t) in enumerate(GOOD)]
    lines.insert(2, {"input": corrupt.name, "source_prompt": "a red circle moving right",  # relative: the manifest's folder
                     "target_prompt": "a blue circle moving right", "steps": STEPS, "output": "broken.mp4"})
    m = folder / "jobs.jsonl"
    m.write_text("# a comment line, then the jobs\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    return m


def _cli_message(args, capsys) -> str:
    """The one line `fastdm-edit` prints for these arguments, without its prefix."""
    assert edit_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastdm-edit: error: ")
    return err[len("fastdm-edit: error: "):]


def test_batch_corrupt_job_worker_killed_and_rerun(ray_local, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is no video\n" * 8)
    manifest = _write_manifest(tmp_path, corrupt)
    out = tmp_path / "runs"
    runner = BatchRunner(manifest, out, workers=2, checkpoint_every=1, quiet=True, log=lambda m: None)
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(summary=runner.run()), daemon=True)
    thread.start()

    # kill the worker of a job that has written a checkpoint and is still running
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        for job, actor in runner.running():
            if (out / batch.CHECKPOINTS / job.ckpt_name / "state.pt").is_file():
                ray_local.kill(actor, no_restart=True)
                killed = job.line
                break
        time.sleep(0.02)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the batch did not finish"
    assert killed is not None, "no job was seen mid-run"

    summary = got["summary"]
    assert (summary["jobs"], summary["done"], summary["failed"]) == (4, 3, 1)
    assert summary["this_run"]["retried"] == 1 and summary["this_run"]["workers"] == 2
    from fastdm.machine import machine_name

    assert summary["machine_name"] == machine_name()  # the batch table is named after it
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 4 and sorted(r["line"] for r in records) == [2, 3, 4, 5]  # (line 1 is the comment)

    # the corrupt input: failed with the CLI's own one-line message, before any work
    bad = next(r for r in records if r["line"] == 4)
    expected = _cli_message([corrupt, "--source-prompt", "a", "--target-prompt", "b", "--out", tmp_path / "x.mp4"], capsys)
    assert bad["status"] == "failed" and bad["error"] == expected and "\n" not in bad["error"]
    assert not any(out.glob("broken*"))

    # the killed job: retried once, resumed from its checkpoint, done; its checkpoint removed
    rec = next(r for r in records if r["line"] == killed)
    assert rec["status"] == "done" and rec["deaths"] == 1 and rec["attempts"] == 2
    assert rec["resumed_from_step"] is not None and 1 <= rec["resumed_from_step"] <= STEPS
    assert not (out / batch.CHECKPOINTS / f"line{killed}-{rec['job']}").exists()
    from fastdm.automask import DEFAULT_MODE

    auto = DEFAULT_MODE == "auto"  # no mask or boxes in the jobs: with the automatic mask, its video too
    for r in records:
        if r["status"] == "done":
            assert r["outputs"] == [r["output"], *[r["output"].replace(".mp4", "_mask.mp4")] * auto,
                                    r["output"].replace(".mp4", "_compare.mp4")]
            assert all((out / f).is_file() for f in r["outputs"])
            report = json.loads((out / r["report"]).read_text())
            assert report["config"]["steps"] == STEPS and report["video"]["frames"] == FRAMES
            assert report["steps_run"] == STEPS - (r["resumed_from_step"] or 0)
            assert r["timings"]["job_s"] > 0
    assert json.loads((out / "summary.json").read_text())["done"] == 3
    table = batch.format_summary(summary)
    assert "retried 1" in table and "edits/hour" in table and expected in table

    # a re-run does nothing: no Ray, results.jsonl and outputs untouched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != "summary.json"}
    again = BatchRunner(manifest, out, workers=2, quiet=True, log=lambda m: None)
    again._run_on_ray = lambda *a, **k: pytest.fail("a re-run of a finished batch started work")
    s2 = again.run()
    assert s2["this_run"]["skipped"] == 4 and s2["this_run"]["done"] == s2["this_run"]["failed"] == 0
    assert (s2["done"], s2["failed"]) == (3, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != "summary.json"} == before


def test_manifest_errors_are_listed_with_line_numbers_before_any_work(tmp_path, capsys):
    clip = str(CLIPS / "red_circle_right.gif")
    good = {"input": clip, "source_prompt": "a", "target_prompt": "b"}
    m = tmp_path / "bad.jsonl"
    m.write_text("\n".join([
        json.dumps(good),
        '{"input": "x.gif", "source_prompt": ',  # 2: not JSON
        json.dumps({"input": clip, "source_prompt": "a"}),  # 3: missing target_prompt
        json.dumps({**good, "stepz": 3}),  # 4: unknown field
        json.dumps({**good, "steps": "ten", "lr": True}),  # 5: wrong types
        json.dumps({**good, "output": "../escape.mp4"}),  # 6: output outside --out
        json.dumps({**good, "output": "a.mp4"}),
        json.dumps({**good, "output": "a.mp4"}),  # 8: same output as line 7
        "[1, 2]",  # 9: not an object
    ]) + "\n")
    out = tmp_path / "runs"
    assert main([str(m), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(e.startswith("fastdm-batch: error: ") for e in err)
    bad_lines = [int(e.split(f"{m}:")[1].split(":")[0]) for e in err[:-1]]
    assert bad_lines == [2, 3, 4, 5, 5, 6, 8, 9]
    assert "'stepz'" in err[2] and "'steps' must be an integer" in err[3] and "'lr' must be a number" in err[4]
    assert "line 7's too" in err[6] and "nothing was run" in err[-1]
    assert not out.exists()  # nothing was written


def test_strict_stops_on_a_job_that_fails_its_checks(tmp_path, capsys):
    (tmp_path / "corrupt.gif").write_bytes(b"GIF89a" + bytes(range(256)))
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"input": str(CLIPS / "red_circle_right.gif"), "source_prompt": "a", "target_prompt": "b"}) + "\n"
                 + json.dumps({"input": "corrupt.gif", "source_prompt": "a", "target_prompt": "b", "steps": 0}) + "\n")
    out = tmp_path / "runs"
    assert main([str(m), "--out", str(out), "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{m}:2: `steps` must be a positive integer, got 0" in err  # the manifest field named, EditConfig checked first
    assert not (out / "results.jsonl").exists()


def test_example_manifest_parses_and_only_the_corrupt_job_fails_its_checks(tmp_path, capsys):
    jobs = read_manifest(ROOT / "examples" / "shapes_jobs.jsonl")
    assert len(jobs) == 4
    errors = {}
    for job in jobs:
        try:
            batch.check_job(job, tmp_path, model=None)
        except fastdm.FastDMError as e:
            errors[Path(job.spec["input"]).name] = str(e)
    assert list(errors) == ["corrupt_clip.mp4"]
    corrupt = ROOT / "examples" / "corrupt_clip.mp4"
    assert errors["corrupt_clip.mp4"] == _cli_message(
        [corrupt, "--source-prompt", "a", "--target-prompt", "b", "--out", tmp_path / "x.mp4"], capsys).replace(
        str(corrupt), jobs[3].paths["input"])


def test_results_survive_a_torn_last_line(tmp_path):
    append_result(tmp_path, {"line": 1, "job": "a", "status": "done"})
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"line": 2, "job": "b", "sta')  # a crash mid-write
    append_result(tmp_path, {"line": 3, "job": "c", "status": "failed"})
    got = read_results(tmp_path)
    assert sorted(got) == [(1, "a"), (3, "c")] and got[(3, "c")]["status"] == "failed"


def test_without_ray_the_command_says_how_to_install(tmp_path, capsys, monkeypatch):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"input": str(CLIPS / "red_circle_right.gif"), "source_prompt": "a", "target_prompt": "b"}) + "\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main([str(m), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err == "fastdm-batch: error: Ray is not installed; install it with: pip install 'fastdm[batch]'\n"


def _has_hf_kernels() -> bool:
    import importlib.metadata as md

    try:
        md.version("kernels")
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_hf_kernels(), reason="needs Hugging Face's `kernels` installed (the pinned test set has it)")
def test_a_worker_that_cannot_start_reports_its_innermost_error(tmp_path):
    """Ray workers put the working directory first on sys.path: a folder `kernels/` there that is not
    Hugging Face's makes diffusers fail deep inside the worker's __init__ (the bug a top-level
    kernels/__init__.py caused). The job's record and the printed table carry the ImportError itself."""
    work = tmp_path / "work"
    (work / "kernels").mkdir(parents=True)
    (work / "kernels" / "__init__.py").write_text("# not Hugging Face's kernels\n")
    manifest = work / "jobs.jsonl"
    manifest.write_text(json.dumps({"input": str(CLIPS / GOOD[0][0]), "source_prompt": GOOD[0][1], "target_prompt": GOOD[0][2],
                                    "steps": 1, "frames": FRAMES}) + "\n")
    out = tmp_path / "runs"
    script = Path(sys.executable).parent / "fastdm-batch"  # (its own folder on sys.path, not the working directory)
    p = subprocess.run([str(script),
                        str(manifest), "--out", str(out), "--workers", "1", "--max-retries", "1"],
                       cwd=work, capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, (p.stdout[-2000:], p.stderr[-3000:])
    (rec,) = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines() if ln.strip()]
    assert rec["status"] == "failed" and rec["deaths"] == 0 and rec["attempts"] == 1, rec
    assert "ImportError: cannot import name" in rec["error"] and str(work / "kernels") in rec["error"], rec["error"]
    assert rec["error"].startswith("its worker could not start: ") and "/tmp/ray" in rec["error"]
    assert "\x1b" not in (out / "results.jsonl").read_text() and "ray::Worker" not in rec["error"]
    assert "ImportError: cannot import name" in p.stdout + p.stderr  # the printed table says it too


def test_actor_errors_become_one_plain_line():
    pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError, RayTaskError

    try:
        try:
            raise ImportError("cannot import name 'X' from 'kernels' (/r/kernels/__init__.py)")
        except ImportError as inner:
            raise RuntimeError("Failed to import diffusers.loaders.peft because of the following error") from inner
    except RuntimeError as e:
        err = e
    assert batch.innermost_error(err) == ("ImportError: cannot import name 'X' from 'kernels' (/r/kernels/__init__.py) "
                                          "(raised under RuntimeError: Failed to import diffusers.loaders.peft because "
                                          "of the following error)")
    import traceback

    tb = "".join(traceback.format_exception(err))
    died = ActorDiedError(RayTaskError("\x1b[36mray::Worker.__init__()\x1b[39m", tb, err))
    line = batch.actor_error_line(died)
    assert line == "ImportError: cannot import name 'X' from 'kernels' (/r/kernels/__init__.py)", line
    plain = ActorDiedError()  # a death with no known cause
    assert "\x1b" not in batch.actor_error_line(plain) and "\n" not in batch.actor_error_line(plain)
