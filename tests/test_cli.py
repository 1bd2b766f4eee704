"""`fastdm-edit` end to end, and every bad input a new user is likely to try."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastdm import EditConfig
from fastdm.cli import main

PROMPTS = ["--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right"]


def digest(path: Path) -> str:
    if path.is_dir():
        return "".join(digest(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def test_end_to_end_writes_video_comparison_and_report(tiny_model, clip_file, tmp_path, capsys):
    out = tmp_path / "out" / "edit.mp4"
    out.parent.mkdir()
    code, err = run_cli([clip_file, *PROMPTS, "--model", tiny_model, "--out", out, "--steps", 2, "--size", "16x16", "--quiet"], capsys)
    assert code == 0, err
    from fastdm.automask import DEFAULT_MODE

    auto = DEFAULT_MODE == "auto"  # without --mask/--boxes: the automatic mask, its video and a 3-panel compare
    assert sorted(p.name for p in out.parent.iterdir()) == ["edit.json", "edit.mp4", "edit_compare.mp4"] + ["edit_mask.mp4"] * auto
    import imageio.v3 as iio

    frames = iio.imread(out, plugin="FFMPEG")
    compare = iio.imread(out.with_name("edit_compare.mp4"), plugin="FFMPEG")
    assert frames.shape == (4, 16, 16, 3) and compare.shape == (4, 16, 16 * (3 if auto else 2), 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps_run"] == 2 and report["config"]["lr"] == EditConfig("a", "b").lr
    assert report["outputs"] == [str(out), *[str(out.with_name("edit_mask.mp4"))] * auto, str(out.with_name("edit_compare.mp4"))]
    assert ("auto_mask" in report) == auto
    assert {"s_ssm", "t_ssm", "vdds"} == set(report["final_losses"])
    assert report["input"]["fps"] == pytest.approx(10)


def test_memory_budget_reports_the_plan_it_chose(tiny_model, clip_file, tmp_path, capsys):
    out = tmp_path / "b.gif"
    code, err = run_cli([clip_file, *PROMPTS, "--model", tiny_model, "--out", out, "--steps", 1, "--size", "16x16",
                         "--memory-budget", "64G", "--quiet", "--no-compare"], capsys)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["plan"]["name"] == "fast" and report["memory_budget"]["bytes"] == 64 * 2**30
    assert report["memory_budget"]["probed_peak_bytes"]["fast"] > 0


def test_boxes_gif_output_and_checkpoint_resume(tiny_model, clip_file, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"0": [2, 4, 10, 12], "3": [8, 4, 16, 12]}))
    out = tmp_path / "e.gif"
    base = [clip_file, *PROMPTS, "--model", tiny_model, "--out", out, "--boxes", boxes, "--size", "16x16", "--quiet"]
    code, err = run_cli(base + ["--steps", 2, "--checkpoint-every", 1], capsys)
    assert code == 0, err
    assert (tmp_path / "e.ckpt" / "state.pt").is_file()
    code, err = run_cli(base + ["--steps", 3, "--resume", tmp_path / "e.ckpt"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["resumed_from_step"] == 2 and report["steps_run"] == 1 and report["video"]["masked"]


def _bad_cases(tmp_path, clip_file, tiny_model):
    """(name, extra args or replaced input, expected message fragment)."""
    import numpy as np

    from fastdm.io import write_video

    (tmp_path / "text.mp4").write_text("not a video at all\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.gif").write_bytes(b"GIF89a" + bytes(range(256)) * 4)
    (tmp_path / "noframes").mkdir()
    small = np.zeros((4, 8, 8, 3), np.uint8)
    write_video(tmp_path / "mask_small.gif", small, 8)
    short = np.zeros((2, 16, 16, 3), np.uint8)
    short[1, :4] = 255  # distinct frames (GIF writers merge identical ones)
    write_video(tmp_path / "mask_short.gif", short, 8)
    (tmp_path / "boxes.json").write_text(json.dumps([[0, 0, 40, 8]]))
    ck = tmp_path / "ck"
    return [
        ("text named mp4", [tmp_path / "text.mp4"], "not a valid mp4"),
        ("empty file", [tmp_path / "empty.mp4"], "empty"),
        ("corrupt gif", [tmp_path / "corrupt.gif"], "could not be"),
        ("missing input", [tmp_path / "nope.mp4"], "does not exist"),
        ("zero frames", [tmp_path / "noframes"], "no .png/.jpg frames"),
        ("mask size", ["--mask", tmp_path / "mask_small.gif"], "mask"),
        ("mask frames", ["--mask", tmp_path / "mask_short.gif"], "frames but the video has 4"),
        ("boxes outside", ["--boxes", tmp_path / "boxes.json"], "outside the 16x16 frame"),
        ("empty prompt", ["--target-prompt", " "], "--target-prompt is empty"),
        ("missing model", ["--model", tmp_path / "no_model"], "does not exist"),
        ("hub id", ["--model", "cerspense/zeroscope_v2_576w"], "download"),
        ("missing out folder", ["--out", tmp_path / "missing" / "o.mp4"], "does not exist"),
        ("unwritable out folder", ["--out", "/proc/o.mp4"], "cannot write"),
        ("out is input", ["--out", clip_file], "never overwrites"),
        ("bad size", ["--size", "15x16"], "multiples of 2"),
        ("other config checkpoint", ["--resume", ck, "--seed", "5"], "different configuration"),
        ("no checkpoint", ["--resume", tmp_path / "noframes"], "no checkpoint there"),
        ("budget too small", ["--memory-budget", "1K"], "too small: even the lean plan needs"),
        ("budget not a size", ["--memory-budget", "lots"], "is not a size"),
        ("budget and plan", ["--memory-budget", "8G", "--plan", "lean"], "not both"),
        ("xformers on cpu", ["--attention", "xformers"], "xformers runs on CUDA GPUs"),
        ("cudagraphs on cpu", ["--backend", "cudagraphs"], "needs the model on a CUDA GPU"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_no_output(tiny_model, clip_file, tmp_path, capsys):
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    ck = tmp_path / "ck"
    # a checkpoint made with seed 0 for the "other config" case
    code, err = run_cli([clip_file, *PROMPTS, "--model", tiny_model, "--out", out_dir / "ck.mp4", "--steps", 1,
                         "--checkpoint-every", 1, "--checkpoint-dir", ck, "--size", "16x16", "--quiet"], capsys)
    assert code == 0, err
    for p in list(out_dir.iterdir()):
        p.unlink()
    cases = _bad_cases(tmp_path, clip_file, tiny_model)
    before = {p: digest(p) for p in tmp_path.iterdir() if p.name != "outs"}
    for name, extra, fragment in cases:
        args = [clip_file, *PROMPTS, "--model", tiny_model, "--out", out_dir / "o.mp4", "--steps", 1, "--size", "16x16", "--quiet"]
        if extra and not str(extra[0]).startswith("--"):
            args[0] = extra[0]
            extra = extra[1:]
        code, err = run_cli(args + extra, capsys)
        assert code == 2, (name, code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastdm-edit: error:"), (name, err)
        assert fragment in lines[0], (name, lines[0])
        assert "Traceback" not in err
        assert list(out_dir.iterdir()) == [], (name, list(out_dir.iterdir()))
    after = {p: digest(p) for p in before}
    assert before == after  # inputs untouched


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["x.mp4", "--source-prompt", "a"])  # no --target-prompt
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--target-prompt" in err


def test_real_process_exit_codes(clip_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdm.cli", str(tmp_path / "missing.mp4"), *PROMPTS],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"fastdm-edit: error: input video '{tmp_path / 'missing.mp4'}' does not exist; check the path"]


def test_help_says_what_the_default_model_knows():
    from fastdm.cli import build_parser

    text = build_parser().format_help()
    assert "shapes" in text and "a red circle moving right" in text and "never downloads" in text
