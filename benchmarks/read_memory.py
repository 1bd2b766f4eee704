"""Peak memory of editing long, large clips: ``fastdm-edit --steps 1`` beside a careful user's read, side by side.

    python -m benchmarks.read_memory                       # 10 s / 60 s / 5 min x 480p / 1080p / 4K, resumable
    python -m benchmarks.read_memory --only 10s-480p --fresh

Clips are made here by ffmpeg's ``testsrc2`` (30 fps, x264 ultrafast; deleted after their row, never committed).
Per clip, each in a fresh process whose own peak resident memory (``ru_maxrss``) is reported:

* **fastdm**: ``fastdm-edit CLIP --steps 1 --mask none --size 32x32 --frames 9 --stride K`` with the bundled model, K
  spreading the 9 kept frames over the whole clip, so every frame is decoded (the checks' pass, then the read at the
  working size) and 9 are held;
* **baseline**, what a careful user writes without fastdm's reader: ``imageio.v3.imread(clip)`` (every frame decoded
  and held), the 9 frames picked and resized, then the same one-step edit through the Python API; run only where twice
  the clip's frames fit in 90 % of the free memory (imageio stacks a list: the peak is about twice what is held), else
  the bytes it would hold are given (frames x W x H x 3).

Two more rows measure what an edit holds per working frame (the ``BYTES_PER_SAMPLE`` of ``fastdm/io/video.py``):
the same command keeping 64 and 1024 frames at 32x32 of the 60 s 480p clip (stride 1); the slope of peak RSS per
sample. Results: ``benchmarks/results/read-memory-<machine>.{json,md}``, a row written as soon as it is measured
(``--fresh`` starts over; otherwise rows already there are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine_description, machine_name

SIZES = {"480p": (854, 480), "1080p": (1920, 1080), "4k": (3840, 2160)}
LENGTHS = {"10s": 10, "60s": 60, "5min": 300}
FPS = 30
PROMPTS = ["--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right"]

_FASTDM = """
import json, resource, sys, time
t = time.perf_counter()
from fastdm.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

_BASELINE = """
import json, resource, sys, time
import numpy as np, imageio.v3 as iio
from PIL import Image
t = time.perf_counter()
frames = iio.imread(sys.argv[1], plugin="FFMPEG")  # every frame, full size
pick = np.linspace(0, len(frames) - 1, 9).round().astype(int)
small = np.stack([np.asarray(Image.fromarray(frames[i]).resize((57, 32), Image.BICUBIC))[:, 12:44] for i in pick])
from fastdm import DreamMotionPipeline  # the same one-step edit of the same 9 frames
DreamMotionPipeline.from_pretrained("shapes")(small, "a red circle moving right", "a blue circle moving right", steps=1, mask=None)
print(json.dumps({"rc": 0, "seconds": time.perf_counter() - t, "frames": int(len(frames)), "held_bytes": int(frames.nbytes),
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_clip(path: Path, seconds: int, size: tuple[int, int]) -> float:
    import imageio_ffmpeg

    t = time.perf_counter()
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size[0]}x{size[1]}:rate={FPS}",
           "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def _python(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"rc": p.returncode, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_fastdm(clip: Path, work: Path, *, frames: int, stride: int) -> dict:
    out = work / "edit.mp4"
    r = _python(_FASTDM, str(clip), *PROMPTS, "--steps", "1", "--mask", "none", "--size", "32x32", "--frames", str(frames),
                "--stride", str(stride), "--out", str(out), "--quiet")
    for f in work.glob("edit*"):
        f.unlink()
    return r


def available() -> int:
    from fastdm.io.video import available_memory

    return available_memory() or 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated rows, e.g. 10s-480p,per-sample")
    ap.add_argument("--fresh", action="store_true", help="measure every row again")
    ap.add_argument("--clips", default=None, help="folder for the generated clips (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from fastdm.io.atomic import write_json_atomic, write_text_atomic

    stem = Path(args.out) / f"read-memory-{machine_name('cpu')}"
    data = {"meta": {}, "rows": []} if args.fresh or not stem.with_suffix(".json").is_file() else \
        json.loads(stem.with_suffix(".json").read_text())
    data["meta"] = {"machine": machine_name("cpu"), "machine_description": machine_description("cpu"), "fps": FPS,
                    "command": "python -m benchmarks.read_memory" + (f" --only {args.only}" if args.only else ""),
                    "date": time.strftime("%Y-%m-%d")}
    done = {r["row"] for r in data["rows"]}
    wanted = [f"{length}-{res}" for res in SIZES for length in LENGTHS] + ["per-sample"]
    if args.only:
        wanted = [w for w in wanted if w in args.only.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(args.clips or tempfile.mkdtemp(prefix="fastdm-read-"))
    work.mkdir(parents=True, exist_ok=True)

    def save():
        data["rows"].sort(key=lambda r: wanted.index(r["row"]) if r["row"] in wanted else 99)
        write_json_atomic(stem.with_suffix(".json"), data)
        write_text_atomic(stem.with_suffix(".md"), markdown(data))

    for row in wanted:
        if row in done:
            continue
        if row == "per-sample":
            clip = work / "60s-480p.mp4"
            make_clip(clip, 60, SIZES["480p"])
            runs = {n: run_fastdm(clip, work, frames=n, stride=1) for n in (64, 1024)}
            slope = (runs[1024]["rss_kib"] - runs[64]["rss_kib"]) * 1024 / ((1024 - 64) * 32 * 32 * 3)
            data["rows"].append({"row": row, "runs": {str(n): r for n, r in runs.items()}, "bytes_per_sample": round(slope, 1)})
            clip.unlink()
            save()
            print(f"{row}: {slope:.1f} B per sample", flush=True)
            continue
        length, res = row.split("-")
        size, seconds = SIZES[res], LENGTHS[length]
        clip = work / f"{row}.mp4"
        make_s = make_clip(clip, seconds, size)
        total = seconds * FPS
        rec = {"row": row, "seconds": seconds, "size": list(size), "frames": total, "clip_bytes": clip.stat().st_size,
               "make_s": round(make_s, 1), "fastdm": run_fastdm(clip, work, frames=9, stride=max(1, (total - 1) // 8))}
        need = total * size[0] * size[1] * 3
        rec["baseline_would_hold_bytes"] = need
        rec["available_bytes"] = available()
        # imageio builds a list of the frames and then stacks it: the baseline peaks near twice what it holds (21 GiB
        # for 11 GB of frames, measured), so it runs only where twice that fits in 90 % of free memory
        rec["baseline"] = _python(_BASELINE, str(clip)) if 2 * need < 0.9 * rec["available_bytes"] else None
        clip.unlink()
        data["rows"].append(rec)
        save()
        f = rec["fastdm"]
        print(f"{row}: fastdm {f.get('rss_kib', 0) / 2**20:.2f} GiB in {f.get('seconds', 0):.0f} s; baseline "
              + (f"{rec['baseline'].get('rss_kib', 0) / 2**20:.2f} GiB" if rec["baseline"] else f"would hold {need / 2**30:.1f} GiB"),
              flush=True)
    return 0


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# Reading long, large clips: peak memory of a 1-step edit ({m['machine']})", "",
             f"`{m['command']}` on {m['machine_description']}, {m['date']}. Clips: ffmpeg `testsrc2` at {m['fps']} fps "
             "(x264 ultrafast), made by the benchmark and deleted. **fastdm**: `fastdm-edit CLIP --steps 1 --mask none --size "
             "32x32 --frames 9 --stride K` with the bundled model (every frame decoded twice, 9 held at 32x32). **baseline**: "
             "`imageio.v3.imread(clip)` (every frame held at full size), then 9 picked and resized and the same 1-step edit "
             "through the Python API; run where twice the frames fit in 90 % "
             "of free memory (the 5 min 480p and 60 s 1080p baseline rows ran under the first rule, 60 % of free memory on the frames "
             "alone, and came within 2 GiB of this machine's memory). Peak resident memory of each process (`ru_maxrss`; the ffmpeg decoder it starts is apart: "
             "children column). GiB = 2^30 bytes.", "",
             "| clip | frames | size | fastdm peak RSS GiB | fastdm s | ffmpeg child GiB | baseline peak RSS GiB | baseline holds GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["row"] == "per-sample":
            continue
        f, b = r["fastdm"], r["baseline"]
        fd = f"{f['rss_kib'] / 2**20:.2f}" if "rss_kib" in f else f"failed: {f.get('error')}"
        base = "-" if b is None else (f"{b['rss_kib'] / 2**20:.2f}" if "rss_kib" in b else f"failed: {b.get('error')}")
        lines.append(f"| {r['row']} | {r['frames']} | {r['size'][0]}x{r['size'][1]} | {fd} | {f.get('seconds', 0):.0f} | "
                     f"{f.get('children_rss_kib', 0) / 2**20:.2f} | {base} | {r['baseline_would_hold_bytes'] / 2**30:.1f} |")
    for r in data["rows"]:
        if r["row"] == "per-sample":
            a, b = r["runs"]["64"], r["runs"]["1024"]
            lines += ["", f"Per working sample (the same command keeping 64 and 1024 frames at 32x32 of the 60 s 480p clip, "
                      f"stride 1): peak RSS {a['rss_kib'] / 2**20:.3f} and {b['rss_kib'] / 2**20:.3f} GiB, "
                      f"{r['bytes_per_sample']} B per sample (frame x pixel x channel); `fastdm/io/video.py` refuses inputs "
                      "with 32 B per sample."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
