"""Video in/out, resize + crop, masks and boxes."""

import json

import numpy as np
import pytest

from fastdm.errors import FastDMError
from fastdm.io import (
    boxes_to_mask,
    check_output_path,
    check_report_path,
    load_mask,
    plan_crop,
    read_boxes,
    read_frames,
    read_video,
    resize_crop,
    write_video,
)
from fastdm.toyworld.world import render_clip


def test_gif_roundtrip_is_lossless_and_keeps_fps(tmp_path):
    clip = render_clip("green", "square", "down", size=16, frames=5, radius=4, speed=2)
    p = tmp_path / "c.gif"
    write_video(p, clip, fps=10)
    frames, fps = read_video(p)
    assert np.array_equal(frames, clip) and fps == pytest.approx(10)


def test_mp4_roundtrip_and_atomic_no_leftovers(tmp_path):
    clip = render_clip("white", "circle", "left", size=32, frames=6, radius=8, speed=2)
    p = tmp_path / "c.mp4"
    write_video(p, clip, fps=12)
    frames, fps = read_video(p)
    assert frames.shape == clip.shape and fps == pytest.approx(12)
    assert np.abs(frames.astype(int) - clip).mean() < 6
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.mp4"]


def test_frame_folder_frames_stride(tmp_path):
    import imageio.v3 as iio

    clip = render_clip("red", "triangle", "up", size=16, frames=7, radius=4, speed=1)
    for i, f in enumerate(clip):
        iio.imwrite(tmp_path / f"{i:03d}.png", f)
    arr, _, idx = read_frames(tmp_path, frames=3, stride=2)
    assert idx == [0, 2, 4] and np.array_equal(arr, clip[[0, 2, 4]])


def test_resize_and_centre_crop():
    frames = np.zeros((1, 20, 40, 3), np.uint8)
    frames[:, :, 10:30] = 255  # centre band of the 40-wide frame
    crop = plan_crop((40, 20), (16, 16))
    out = resize_crop(frames, crop)
    assert out.shape == (1, 16, 16, 3)
    assert crop.scale == pytest.approx(0.8) and crop.x == 8 and crop.y == 0
    assert out[0, :, 2:14].min() > 200  # the band (x 8..24 after scaling) covers the crop's middle


def test_boxes_interpolate_keyframes(tmp_path):
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"0": [0, 0, 4, 4], "4": [8, 0, 12, 4]}))
    crop = plan_crop((16, 16), (16, 16))
    m = boxes_to_mask(str(p), indices=[0, 2, 4, 6], src_size=(16, 16), crop=crop)
    assert m.shape == (4, 16, 16)
    cols = [np.nonzero(m[i].any(0))[0] for i in range(4)]
    assert (cols[0].min(), cols[0].max()) == (0, 3)
    assert (cols[1].min(), cols[1].max()) == (4, 7)  # halfway: [4, 0, 8, 4]
    assert (cols[2].min(), cols[2].max()) == (8, 11)
    assert np.array_equal(m[3], m[2])  # held after the last keyframe


@pytest.mark.parametrize(
    "content,match",
    [
        ("[[0, 0, 20, 4]]", "outside"),
        ("[[5, 5, 2, 8]]", "outside"),
        ("{not json", "not valid JSON"),
        ("[[1, 2, 3]]", r"\[x0, y0, x1, y1\]"),
        ("[]", "no boxes"),
    ],
)
def test_bad_boxes(tmp_path, content, match):
    p = tmp_path / "b.json"
    p.write_text(content)
    with pytest.raises(FastDMError, match=match):
        boxes_to_mask(str(p), indices=[0], src_size=(16, 16), crop=plan_crop((16, 16), (16, 16)))


def test_mask_video_and_single_image(tmp_path):
    import imageio.v3 as iio

    clip = render_clip("white", "square", "right", size=16, frames=4, radius=4, speed=2)
    write_video(tmp_path / "m.gif", clip, fps=8)
    crop = plan_crop((16, 16), (16, 16))
    m = load_mask(str(tmp_path / "m.gif"), indices=[0, 1, 2, 3], src_size=(16, 16), total_frames=4, crop=crop)
    assert m.shape == (4, 16, 16) and set(np.unique(m)) == {0.0, 1.0}
    assert np.array_equal(m > 0, clip.mean(-1) > 127.5)
    iio.imwrite(tmp_path / "one.png", clip[0])
    m1 = load_mask(str(tmp_path / "one.png"), indices=[0, 1, 2], src_size=(16, 16), total_frames=None, crop=crop)
    assert m1.shape == (3, 16, 16) and np.array_equal(m1[2], m1[0])
    with pytest.raises(FastDMError, match="frames but the video has 6"):
        load_mask(str(tmp_path / "m.gif"), indices=[0], src_size=(16, 16), total_frames=6, crop=crop)
    with pytest.raises(FastDMError, match="video's size"):
        load_mask(str(tmp_path / "m.gif"), indices=[0], src_size=(32, 16), total_frames=4, crop=crop)


def test_bad_video_files(tmp_path):
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "x.txt").write_text("hi")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FastDMError, match="not a valid mp4"):
        read_frames(tmp_path / "text.mp4")
    with pytest.raises(FastDMError, match="empty"):
        read_frames(tmp_path / "empty.mp4")
    with pytest.raises(FastDMError, match="unsupported type"):
        read_frames(tmp_path / "x.txt")
    with pytest.raises(FastDMError, match="no .png/.jpg frames"):
        read_frames(tmp_path / "nothing")
    with pytest.raises(FastDMError, match="does not exist"):
        read_frames(tmp_path / "missing.mp4")


def test_output_path_checks(tmp_path):
    inp = tmp_path / "in.mp4"
    inp.write_bytes(b"x")
    with pytest.raises(FastDMError, match="never overwrites"):
        check_output_path(inp, inputs=[inp])
    with pytest.raises(FastDMError, match="does not exist"):
        check_output_path(tmp_path / "no" / "o.mp4")
    with pytest.raises(FastDMError, match="must end in"):
        check_output_path(tmp_path / "o.avi")
    with pytest.raises(FastDMError, match="cannot write"):
        check_output_path("/proc/o.mp4")


def test_read_frames_counts_the_whole_input_in_one_pass(tmp_path):
    clip = render_clip("red", "circle", "right", size=16, frames=7, radius=4, speed=1)
    path = tmp_path / "c.gif"
    write_video(path, clip, 8)
    got, _, idx, total = read_frames(path, frames=2, stride=2, with_total=True)
    assert idx == [0, 2] and total == 7 and np.array_equal(got, clip[[0, 2]])
    assert len(read_frames(path, frames=2)) == 3  # the plain form is unchanged


def test_one_frame_gif_mask_is_not_a_still(tmp_path):
    """Only a png/jpg applies to every frame: a GIF of a static mask keeps one frame (writers merge
    identical frames), and taking it for a still would hide a wrong frame count."""
    still = np.zeros((3, 16, 16, 3), np.uint8)
    still[:, 4:12, 4:12] = 255
    write_video(tmp_path / "m.gif", still, fps=8)
    crop = plan_crop((16, 16), (16, 16))
    with pytest.raises(FastDMError, match="has 1 frame but the video has 8 .*GIF"):
        load_mask(str(tmp_path / "m.gif"), indices=list(range(8)), src_size=(16, 16), total_frames=8, crop=crop)
    write_video(tmp_path / "m.mp4", still, fps=8)
    with pytest.raises(FastDMError, match="has 3 frames but the video has 8; give one mask frame per video frame"):
        load_mask(str(tmp_path / "m.mp4"), indices=list(range(8)), src_size=(16, 16), total_frames=8, crop=crop)


@pytest.mark.parametrize(
    "content,match",
    [
        ("[[0, 0, 4, 4], [0, 0, 4, 4]]", "has 2 boxes but the video has 4 frames"),
        ('{"0": [0, 0, 4, 4], "9": [0, 0, 4, 4]}', "keyframe 9 is past the video's last frame"),
        ("[0, 0, 4, 4]", "list of boxes"),
    ],
)
def test_boxes_must_match_the_frame_count(tmp_path, content, match):
    p = tmp_path / "b.json"
    p.write_text(content)
    with pytest.raises(FastDMError, match=match):
        read_boxes(p, src_size=(16, 16), total_frames=4)


def test_single_box_applies_to_every_frame(tmp_path):
    p = tmp_path / "b.json"
    p.write_text("[[0, 0, 4, 4]]")
    m = boxes_to_mask(read_boxes(p, src_size=(16, 16), total_frames=4), indices=[0, 1, 2, 3], src_size=(16, 16),
                      crop=plan_crop((16, 16), (16, 16)))
    assert m.shape == (4, 16, 16) and all(np.array_equal(m[i], m[0]) for i in range(4)) and m[0].sum() == 16


def test_truncated_mp4_is_refused(tmp_path):
    """With its index first (faststart), ffmpeg decodes what is left of a cut mp4 without a word."""
    import imageio.v3 as iio

    clip = render_clip("red", "circle", "right", size=64, frames=24, radius=8, speed=2)
    clip = np.clip(clip + np.random.default_rng(0).integers(0, 40, clip.shape), 0, 255).astype(np.uint8)
    p = tmp_path / "fs.mp4"
    iio.imwrite(p, clip, plugin="FFMPEG", fps=8, codec="libx264", macro_block_size=1, ffmpeg_params=["-movflags", "+faststart"])
    assert len(read_frames(p)[0]) == 24  # the whole file is fine
    data = p.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(FastDMError, match="is truncated"):
        read_frames(tmp_path / "cut.mp4")


def test_report_path_checks(tmp_path):
    b = tmp_path / "b.json"
    b.write_text("[]")
    with pytest.raises(FastDMError, match="would overwrite the input"):
        check_report_path(b, inputs=[b])
    with pytest.raises(FastDMError, match="must end in .json"):
        check_report_path(tmp_path / "r.txt")
    with pytest.raises(FastDMError, match="does not exist"):
        check_report_path(tmp_path / "no" / "r.json")
    with pytest.raises(FastDMError, match="cannot write"):
        check_report_path("/proc/r.json")
    assert check_report_path(tmp_path / "r.json") == tmp_path / "r.json"


def test_animated_png_is_a_video(tmp_path):
    import imageio.v3 as iio

    clip = render_clip("blue", "square", "up", size=16, frames=3, radius=4, speed=2)
    iio.imwrite(tmp_path / "a.png", clip, extension=".png")
    arr, _, idx = read_frames(tmp_path / "a.png")
    assert arr.shape == (3, 16, 16, 3) and idx == [0, 1, 2]
    with pytest.raises(FastDMError, match="has 3 frames but the video has 5"):
        load_mask(str(tmp_path / "a.png"), indices=[0], src_size=(16, 16), total_frames=5, crop=plan_crop((16, 16), (16, 16)))


def test_frames_resized_while_decoding_equal_resized_afterwards_and_the_probe_keeps_none(tmp_path):
    """fastdm-edit probes its input (every check, nothing kept) and then decodes it at the working size frame by
    frame: the same pixels as decoding everything and resizing afterwards, the same indices, fps and counts."""
    from fastdm.io.video import plan_crop, probe_frames, read_frames, resize_crop

    import imageio.v3 as iio
    import numpy as np

    rng = np.random.default_rng(0)
    clip = tmp_path / "c.gif"
    iio.imwrite(clip, rng.integers(0, 255, (7, 24, 40, 3), dtype=np.uint8), extension=".gif", duration=100, loop=0)
    full, fps, idx, total = read_frames(clip, frames=3, stride=2, with_total=True)
    small, fps2, idx2 = read_frames(clip, frames=3, stride=2, size=(16, 12))
    assert np.array_equal(small, resize_crop(full, plan_crop((40, 24), (16, 12)))) and small.shape == (3, 12, 16, 3)
    seen = probe_frames(clip, frames=3, stride=2, with_total=True)
    assert (seen["fps"], seen["indices"], seen["size"], seen["total"]) == (fps, idx, (40, 24), total) == (fps2, idx2, (40, 24), 7)
    assert "total" not in probe_frames(clip, frames=1)


def _numbered_clip(path, n=48, fps=24):
    """A 16x16 mp4 whose frame i is grey level 5 i (read back to within codec error)."""
    from fastdm.io import write_video

    write_video(path, np.stack([np.full((16, 16, 3), 5 * i, np.uint8) for i in range(n)]), fps)
    return path


def test_start_and_end_select_the_part_of_a_clip_in_seconds(tmp_path):
    from fastdm.io.video import kept_count, probe_frames, source_info

    clip = _numbered_clip(tmp_path / "n.mp4")
    arr, fps, idx = read_frames(clip, start=0.5, end=1.25)
    assert fps == 24 and idx == list(range(12, 30)) and np.abs(arr[:, 0, 0, 0].astype(int) - 5 * np.arange(12, 30)).max() <= 3
    _, _, idx = read_frames(clip, start=1.0, stride=5, frames=3)
    assert idx == [24, 29, 34]
    assert probe_frames(clip, start=0.5, end=1.25)["indices"] == list(range(12, 30))
    info = source_info(clip)  # from the container, nothing decoded
    assert (info["frames"], info["fps"], info["size"]) == (48, 24.0, (16, 16))
    assert kept_count(48, 24.0, start=0.5, end=1.25) == 18 and kept_count(48, 24.0, start=1.0, stride=5, frames=3) == 3
    with pytest.raises(FastDMError, match=r"no frames between `start` and `end`: it has 48 frames at 24 fps \(2.00 s\)"):
        read_frames(clip, start=3.0)
    with pytest.raises(FastDMError, match="must come after `start`"):
        read_frames(clip, start=1.0, end=0.5)
    with pytest.raises(FastDMError, match="number of seconds >= 0"):
        probe_frames(clip, start=-1)


def test_read_frames_holds_only_the_picked_frames(tmp_path):
    clip = _numbered_clip(tmp_path / "n.mp4")
    arr, _, idx = read_frames(clip, stride=2, pick=[3, 0, 3], size=(8, 8))
    assert idx == [6, 0, 6] and arr.shape == (3, 8, 8, 3)
    with pytest.raises(FastDMError, match="has 24 frames to pick from; position 30 is past them"):
        read_frames(clip, stride=2, pick=[30])
    with pytest.raises(FastDMError, match="no frame positions to pick"):
        read_frames(clip, pick=[])


def test_an_input_too_large_for_memory_is_refused_with_the_arithmetic_before_decoding(tmp_path, monkeypatch, capsys):
    import fastdm.io.video as video
    from fastdm.cli import main

    clip = _numbered_clip(tmp_path / "n.mp4")
    monkeypatch.setattr(video, "available_memory", lambda: 48 * 32 * 32 * 3 * video.BYTES_PER_SAMPLE)  # 48 frames, no margin

    def no_decoding(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(video, "_iter_frames", no_decoding)
    out = tmp_path / "e.mp4"
    code = main([str(clip), "--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right",
                 "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"48 frames (of 48 at 24 fps) at 32x32 need about 48 x 32 x 32 x 3 x {video.BYTES_PER_SAMPLE} B" in err
    assert "--start/--end" in err  # (the command line's flag names)
    with pytest.raises(FastDMError, match="this machine has"):
        video.check_fits(10, (64, 64), available=10 * 64 * 64 * 3 * video.BYTES_PER_SAMPLE)
    video.check_fits(10, (64, 64), available=2 * 10 * 64 * 64 * 3 * video.BYTES_PER_SAMPLE)  # fits
    # a latent model holds less per working sample on the host: the same read fits there
    video.check_fits(10, (64, 64), available=10 * 64 * 64 * 3 * video.BYTES_PER_SAMPLE, space="latent")


def test_fastdm_edit_edits_a_part_of_a_clip_given_in_seconds(tmp_path, capsys):
    from fastdm.cli import main

    clip = tmp_path / "c.mp4"
    write_video(clip, np.ascontiguousarray(render_clip("red", "circle", "right", size=32, frames=48, radius=8, speed=1)), 24)
    out = tmp_path / "e.mp4"
    assert main([str(clip), "--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right",
                 "--steps", "1", "--mask", "none", "--start", "0.5", "--end", "1.0", "--out", str(out), "--quiet"]) == 0, \
        capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["input"]["frame_indices"] == list(range(12, 24))
    assert read_frames(out)[0].shape[0] == 12 and read_frames(out.with_name("e_compare.mp4"))[0].shape == (12, 32, 64, 3)


@pytest.mark.parametrize("flags", [["--end", "inf"], ["--start", "nan"], ["--start", "2", "--end", "1"]])
def test_a_bad_span_is_one_line_exit_2(tmp_path, capsys, flags):
    from fastdm.cli import main

    clip = _numbered_clip(tmp_path / "n.mp4")
    code = main([str(clip), "--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right",
                 "--steps", "1", "--out", str(tmp_path / "e.mp4"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and ("end" in err or "start" in err)
