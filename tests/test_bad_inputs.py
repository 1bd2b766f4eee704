"""Every bad input a new user is likely to try fails the same clean way.

The standard: a one-line error on stderr that says what is wrong and what to do
(``fastdm-edit: error: ...``), exit code 2, no traceback, no output/compare/report file, and
every input left byte-for-byte untouched. Each case must fail during validation, before the
edit runs (the pipeline call is patched to fail the test if it is reached).

The cases use the bundled clip (8 frames, 32x32) and the bundled model (the default --model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import fastdm
from fastdm.cli import main

BUNDLED_CLIP = Path(fastdm.__file__).parent / "assets" / "clips" / "red_circle_right.gif"  # 8 frames, 32x32
PROMPTS = ["--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every file under ``root`` (but ``skip``) with its hash: a changed, added or removed file shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == skip or skip in d.parents:
            continue
        for f in filenames:
            out[str(d / f)] = _digest(d / f)
    return out


class Ctx:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.clip = tmp / "clip.gif"  # a copy: the "output is the input" case must never touch the package
        shutil.copyfile(BUNDLED_CLIP, self.clip)
        self.outdir = tmp / "out"
        self.outdir.mkdir()
        self.out = self.outdir / "o.mp4"

    def argv(self, *extra, inp=None, out=None):
        return [str(inp or self.clip), *PROMPTS, "--out", str(out or self.out), "--steps", "1", "--quiet", *map(str, extra)]

    def video(self, name: str, frames: np.ndarray, fps: float = 8) -> Path:
        from fastdm.io import write_video

        write_video(self.tmp / name, frames, fps)
        return self.tmp / name

    def text(self, name: str, content: str) -> Path:
        (self.tmp / name).write_text(content)
        return self.tmp / name

    def bytes(self, name: str, content: bytes) -> Path:
        (self.tmp / name).write_bytes(content)
        return self.tmp / name

    def folder(self, name: str) -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name

    def mp4_bytes(self) -> bytes:
        from fastdm.io import read_frames

        frames = read_frames(self.clip)[0]
        p = self.video("_good.mp4", frames)
        data = p.read_bytes()
        p.unlink()
        return data


def _mask(n: int, size: int = 32, distinct: bool = True) -> np.ndarray:
    m = np.zeros((n, size, size, 3), np.uint8)
    m[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    if distinct:  # GIF writers merge identical consecutive frames
        for i in range(n):
            m[i, 0, i % size] = 255
    return m


def _corrupt_head(c: Ctx):
    data = bytearray(c.mp4_bytes())
    data[:64] = bytes(range(64, 128))
    (c.tmp / "corrupt.mp4").write_bytes(bytes(data))
    return c.argv(inp=c.tmp / "corrupt.mp4")


def _corrupt_index(c: Ctx):
    data = bytearray(c.mp4_bytes())
    i = data.find(b"moov")
    data[i : i + 200] = bytes(200)
    (c.tmp / "corrupt.mp4").write_bytes(bytes(data))
    return c.argv(inp=c.tmp / "corrupt.mp4")


def _truncated_mp4(c: Ctx):
    data = c.mp4_bytes()
    (c.tmp / "cut.mp4").write_bytes(data[: len(data) // 2])
    return c.argv(inp=c.tmp / "cut.mp4")


def _truncated_faststart_mp4(c: Ctx):
    """Index (moov) first: ffmpeg decodes the frames that are left and says nothing."""
    import imageio.v3 as iio

    from fastdm.toyworld.world import render_clip

    clip = render_clip("red", "circle", "right", size=64, frames=24, radius=8, speed=2)
    clip = np.clip(clip + np.random.default_rng(0).integers(0, 40, clip.shape), 0, 255).astype(np.uint8)  # bytes to cut
    p = c.tmp / "fs.mp4"
    iio.imwrite(p, clip, plugin="FFMPEG", fps=8, codec="libx264", macro_block_size=1, ffmpeg_params=["-movflags", "+faststart"])
    data = p.read_bytes()
    p.unlink()
    assert data.find(b"moov") < data.find(b"mdat")
    (c.tmp / "cut.mp4").write_bytes(data[: int(len(data) * 0.8)])  # ffmpeg decodes 21 of the 24 frames
    return c.argv(inp=c.tmp / "cut.mp4")


def _frame_folder_with_a_broken_frame(c: Ctx):
    import imageio.v3 as iio

    d = c.tmp / "frames"
    d.mkdir()
    iio.imwrite(d / "000.png", np.zeros((32, 32, 3), np.uint8))
    (d / "001.png").write_text("not a png")
    return c.argv(inp=d)


def _frame_folder_of_other_files(c: Ctx):
    d = c.tmp / "frames"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return c.argv(inp=d)


def _unwritable_dir(c: Ctx) -> Path:
    d = c.tmp / "readonly"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)  # 555
    try:  # as root a 555 folder is writable: really try, and fall back to a folder nobody can write
        (d / ".probe").write_bytes(b"")
    except OSError:
        return d
    (d / ".probe").unlink()
    return Path("/proc")


CASES = {
    # the input
    "text file named .mp4": lambda c: c.argv(inp=c.text("notes.mp4", "this is not a video\n")),
    "empty .mp4": lambda c: c.argv(inp=c.text("empty.mp4", "")),
    "corrupt mp4 header": _corrupt_head,
    "corrupt mp4 index": _corrupt_index,
    "truncated mp4": _truncated_mp4,
    "truncated mp4, index first": _truncated_faststart_mp4,
    "truncated gif": lambda c: c.argv(inp=c.bytes("cut.gif", BUNDLED_CLIP.read_bytes()[:700])),
    "unsupported file type": lambda c: c.argv(inp=c.text("clip.txt", "hi")),
    "missing input": lambda c: c.argv(inp=c.tmp / "nope.gif"),
    "empty frame folder": lambda c: c.argv(inp=c.folder("frames")),
    "frame folder without images": _frame_folder_of_other_files,
    "frame folder with a broken frame": _frame_folder_with_a_broken_frame,
    # the mask
    "mask of another size": lambda c: c.argv("--mask", c.video("m.gif", _mask(8, size=16))),
    "still mask of another size": lambda c: c.argv("--mask", _png(c, _mask(1, size=16)[0])),
    "mask with 3 frames (gif)": lambda c: c.argv("--mask", c.video("m.gif", _mask(3))),
    "mask with 3 identical frames (gif keeps one)": lambda c: c.argv("--mask", c.video("m.gif", _mask(3, distinct=False))),
    "mask with 3 frames (mp4)": lambda c: c.argv("--mask", c.video("m.mp4", _mask(3, distinct=False))),
    "mask with 3 frames (folder)": lambda c: c.argv("--mask", _png_folder(c, _mask(3))),
    "mask with 3 frames (animated png)": lambda c: c.argv("--mask", _apng(c, _mask(3))),
    "mask with 12 frames": lambda c: c.argv("--mask", c.video("m.gif", _mask(12))),
    "mask with 3 frames and --frames 3": lambda c: c.argv("--mask", c.video("m.gif", _mask(3)), "--frames", 3),
    "missing mask": lambda c: c.argv("--mask", c.tmp / "nope.gif"),
    "corrupt mask": lambda c: c.argv("--mask", c.text("m.mp4", "not a video")),
    # the boxes
    "boxes outside the frame": lambda c: c.argv("--boxes", c.text("b.json", json.dumps([[0, 0, 40, 8]] * 8))),
    "box keyframe outside the frame": lambda c: c.argv("--boxes", c.text("b.json", json.dumps({"0": [0, 0, 8, 8], "7": [-4, 0, 8, 8]}))),
    "boxes not JSON": lambda c: c.argv("--boxes", c.text("b.json", "[[0, 0, 8, 8],")),
    "boxes file is binary": lambda c: c.argv("--boxes", c.bytes("b.json", b"\xff\xfe\x00garbage")),
    "boxes of 3 numbers": lambda c: c.argv("--boxes", c.text("b.json", json.dumps([[0, 0, 8]] * 8))),
    "boxes flat list": lambda c: c.argv("--boxes", c.text("b.json", json.dumps([0, 0, 8, 8]))),
    "boxes as a string": lambda c: c.argv("--boxes", c.text("b.json", json.dumps("0 0 8 8"))),
    "boxes with 3 entries for 8 frames": lambda c: c.argv("--boxes", c.text("b.json", json.dumps([[0, 0, 8, 8]] * 3))),
    "boxes with 9 entries for 8 frames": lambda c: c.argv("--boxes", c.text("b.json", json.dumps([[0, 0, 8, 8]] * 9))),
    "box keyframe after the last frame": lambda c: c.argv("--boxes", c.text("b.json", json.dumps({"0": [0, 0, 8, 8], "20": [8, 0, 16, 8]}))),
    "box keyframe not a number": lambda c: c.argv("--boxes", c.text("b.json", json.dumps({"first": [0, 0, 8, 8]}))),
    "missing boxes file": lambda c: c.argv("--boxes", c.tmp / "nope.json"),
    # prompts
    "empty target prompt": lambda c: c.argv("--target-prompt", ""),
    "blank source prompt": lambda c: c.argv("--source-prompt", "   "),
    # the model
    "missing model folder": lambda c: c.argv("--model", c.tmp / "no_model"),
    "hub id as --model": lambda c: c.argv("--model", "cerspense/zeroscope_v2_576w"),
    "model is a file": lambda c: c.argv("--model", c.text("model.safetensors", "x")),
    "model folder without model_index.json": lambda c: c.argv("--model", c.folder("m")),
    # numbers
    "negative --steps": lambda c: c.argv("--steps", -5),
    "--steps 0": lambda c: c.argv("--steps", 0),
    "--steps not a number": lambda c: c.argv("--steps", "many"),
    "--frames 0": lambda c: c.argv("--frames", 0),
    "negative --frames": lambda c: c.argv("--frames", -3),
    "--stride 0": lambda c: c.argv("--stride", 0),
    "negative --stride": lambda c: c.argv("--stride", -1),
    "--lr 0": lambda c: c.argv("--lr", 0),
    "negative --checkpoint-every": lambda c: c.argv("--checkpoint-every", -1),
    "--size 0x16": lambda c: c.argv("--size", "0x16"),
    "--size not WxH": lambda c: c.argv("--size", "big"),
    "negative --guidance-scale": lambda c: c.argv("--guidance-scale", -1),
    "--device cuda without a GPU": lambda c: c.argv("--device", "cuda") if not _has_cuda() else pytest.skip("a GPU is here"),
    "--resume is a file": lambda c: c.argv("--resume", c.text("ck.json", "{}")),
    "--checkpoint-dir is a file": lambda c: c.argv("--checkpoint-every", 1, "--checkpoint-dir", c.text("ck.txt", "x")),
    "boxes path is a folder": lambda c: c.argv("--boxes", c.folder("boxes")),
    "mask is an empty folder": lambda c: c.argv("--mask", c.folder("maskframes")),
    # outputs
    "output in a missing folder": lambda c: c.argv(out=c.tmp / "missing" / "o.mp4"),
    "output in an unwritable folder": lambda c: c.argv(out=_unwritable_dir(c) / "o.mp4"),
    "output of an unsupported type": lambda c: c.argv(out=c.outdir / "o.avi"),
    "output is the input": lambda c: c.argv(out=c.clip),
    "output is the mask": lambda c: c.argv("--mask", c.video("m.gif", _mask(8)), out=c.tmp / "m.gif"),
    "comparison video would overwrite the input": lambda c: c.argv(inp=c.video("o_compare.mp4", _mask(8)), out=c.tmp / "o.mp4"),
    "report is the boxes file": lambda c: c.argv("--boxes", c.text("b.json", json.dumps([[0, 0, 8, 8]] * 8)), "--report", c.tmp / "b.json"),
    "report in a missing folder": lambda c: c.argv("--report", c.tmp / "missing" / "r.json"),
    "report in an unwritable folder": lambda c: c.argv("--report", _unwritable_dir(c) / "r.json"),
    "report not .json": lambda c: c.argv("--report", c.outdir / "r.txt"),
}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _png(c: Ctx, frame: np.ndarray) -> Path:
    import imageio.v3 as iio

    iio.imwrite(c.tmp / "m.png", frame)
    return c.tmp / "m.png"


def _apng(c: Ctx, frames: np.ndarray) -> Path:
    import imageio.v3 as iio

    iio.imwrite(c.tmp / "m.png", frames, extension=".png")
    return c.tmp / "m.png"


def _png_folder(c: Ctx, frames: np.ndarray) -> Path:
    import imageio.v3 as iio

    d = c.tmp / "maskframes"
    d.mkdir()
    for i, f in enumerate(frames):
        iio.imwrite(d / f"{i:03d}.png", f)
    return d


@pytest.fixture(autouse=True)
def _edit_must_not_run(monkeypatch):
    import fastdm.driver as driver

    def edit(*a, **k):
        raise AssertionError("the edit ran: validation should have stopped this bad input first")

    for cls, name in (("DreamMotionPipeline", "__call__"), ("Editor", "edit")):
        if hasattr(getattr(driver, cls, None), name):
            monkeypatch.setattr(getattr(driver, cls), name, edit)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(name, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"  # default outputs would land here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    c = Ctx(tmp_path)
    bundled = _digest(BUNDLED_CLIP)
    argv = CASES[name](c)
    before = _snapshot(tmp_path, skip=c.outdir)
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors exit from inside main
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (code, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastdm-edit: error:"), err
        assert err.endswith("\n") and "Traceback" not in err
        assert list(c.outdir.iterdir()) == [] and list(cwd.iterdir()) == []
        assert _snapshot(tmp_path, skip=c.outdir) == before  # nothing written beside the inputs, nothing changed
        assert _digest(BUNDLED_CLIP) == bundled
    finally:
        ro = tmp_path / "readonly"
        if ro.exists():
            ro.chmod(0o755)


def test_a_still_image_mask_applies_to_every_frame(tmp_path):
    """The one short mask that is fine: a single png/jpg is the mask of every frame."""
    from fastdm.io import load_mask, plan_crop, read_frames

    c = Ctx(tmp_path)
    frames, _, idx, total = read_frames(c.clip, with_total=True)
    m = load_mask(str(_png(c, _mask(1)[0])), indices=idx, src_size=(32, 32), total_frames=total, crop=plan_crop((32, 32), (32, 32)))
    assert m.shape == (8, 32, 32) and all(np.array_equal(m[i], m[0]) for i in range(8))
