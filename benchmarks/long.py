"""Long clips: windows on one shared tensor against the obvious alternatives, on both bundled models.

Each case is a generated shapes clip of 8, 16, 32 or 64 frames whose object goes right and back (11
frames each way at 1.5 px/frame, so it stays in the 32x32 frame at any length, and its turns never
fall on a multiple of 8), edited to another colour three ways:

* ``windowed``  fastdm's windows (``--window 8``, the models' own length): one tensor for the whole
  clip, windows at a random phase each step, every frame one update per step;
* ``chunks``    the clip cut into 8-frame pieces, each edited on its own and the edits concatenated
  (what a user without windows would do);
* ``whole``     every frame given to the model at once (``--window`` = the clip's length).

At 8 frames the three are the same edit (one row). Scored over all frames: target colour in every
frame, centroid drift, a seam measure, peak memory and seconds. Seam: the mean frame-to-frame change
(0-255) between frames 8k-1 and 8k (the chunks' borders) over the mean change between the other
neighbouring frames, edit minus source (0: the borders change no more than elsewhere, as in the
source). Peak memory: the process's RSS high-water mark during the edit above its RSS when the edit
began (the model and libraries excluded), on this CPU.

    python -m benchmarks.long [--model shapes|shapes-dit] [--lengths 8,16,32,64] [--threads 1]

Writes ``results/long-<model>-<machine>.{json,md}``; runs are cached in ``.runs.jsonl`` beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, denoiser_hash, machine_description, machine_name, repo_relative, runs_machines, write_results
from benchmarks.suite import over_builtins
from fastdm.toyworld.world import render_back_and_forth
from fastdm.toyworld.metrics import centroid_drift, video_summary

WINDOW = 8
CASES = [("red", "circle", "blue"), ("blue", "square", "red"), ("yellow", "triangle", "magenta")]
METHODS = ("windowed", "chunks", "whole")


def long_clip(colour: str, shape: str, frames: int) -> np.ndarray:
    return render_back_and_forth(colour, shape, frames)


def seam(source: np.ndarray, edit: np.ndarray, every: int = WINDOW) -> float:
    """Border change over inside change of the edit, minus the same of the source (see the docstring)."""
    def ratio(v):
        d = np.abs(np.diff(v.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # change from frame i to i+1
        border = [d[i] for i in range(len(d)) if (i + 1) % every == 0]
        inside = [d[i] for i in range(len(d)) if (i + 1) % every != 0]
        return float(np.mean(border) / max(np.mean(inside), 1e-6)) if border else 1.0
    return ratio(edit) - ratio(source)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(pipe, clip: np.ndarray, src: str, tgt: str, method: str, settings: dict) -> dict:
    t0 = time.perf_counter()
    start = _rss()
    if method == "chunks" and len(clip) > WINDOW:
        parts, peaks, evals = [], [], {"forward": 0, "backward": 0}
        for s in range(0, len(clip), WINDOW):
            piece = clip[s:s + WINDOW]
            res = pipe(piece, src, tgt, mask="auto", **over_builtins(pipe, settings))
            parts.append(res.frames)
            peaks.append(res.report["peak_memory_bytes"])
            for k in evals:
                evals[k] += res.report["evaluations"][k]
        frames, peak = np.concatenate(parts), max(peaks)
    else:
        window = WINDOW if method == "windowed" else len(clip)
        res = pipe(clip, src, tgt, mask="auto", window=window, **over_builtins(pipe, settings))
        frames, peak, evals = res.frames, res.report["peak_memory_bytes"], res.report["evaluations"]
    return {"frames": frames, "seconds": time.perf_counter() - t0, "peak_above_start_bytes": max(0, peak - start),
            "evaluations": {k: evals[k] for k in ("forward", "backward")}}


def main(argv: list[str] | None = None) -> int:
    from fastdm import DreamMotionPipeline, EditConfig
    from fastdm.backbone import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--lengths", default="8,16,32,64")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # FRAMES,CASE_INDEX,METHOD in this process
    ap.add_argument("--project", action="store_true",
                    help="no edits: project the GPU peak of ZeroScope 576w and Wan 2.1 1.3B at 5 s and 10 s with windows, from "
                         "the committed memory projections (writes results/long-projection-<machine>.{json,md})")
    args = ap.parse_args(argv)
    if args.project:
        return project()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    if args.one:
        frames, i, method = args.one.split(",")
        colour, shape, target = CASES[int(i)]
        pipe = DreamMotionPipeline.from_pretrained(model)
        clip = long_clip(colour, shape, int(frames))
        got = run_one(pipe, clip, f"a {colour} {shape} moving right", f"a {target} {shape} moving right", method, {})
        edit = got.pop("frames")
        summary = video_summary(edit)
        got.update(colour_ok=all(c == target for c in summary["colours"]),
                   colour_frames_ok=sum(c == target for c in summary["colours"]) / int(frames),
                   drift_px=centroid_drift(clip, edit), seam=seam(clip, edit))
        print(json.dumps(got))
        return 0
    denoiser, model_hash = denoiser_hash(model)
    machine = machine_name()
    stem = f"long-{args.model}-{machine}"
    cache = RESULTS / f"{stem}.runs.jsonl"
    fp = EditConfig("a", "b").fingerprint()
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["case"], r["frames"], r["model_hash"], r["config"])] = r
    import os
    import subprocess
    import sys

    for frames in [int(v) for v in args.lengths.split(",")]:
        for i, (colour, shape, target) in enumerate(CASES):
            for method in args.methods.split(","):
                if frames <= WINDOW and method != "whole":
                    continue
                case = f"{colour}-{shape}-to-{target}"
                key = (method, case, frames, model_hash, fp)
                if key in done:
                    continue
                # a fresh process per edit: its memory high-water mark is its own
                cmd = [sys.executable, "-m", "benchmarks.long", "--model", args.model, "--one", f"{frames},{i},{method}",
                       *(["--threads", str(args.threads)] if args.threads else [])]
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if p.returncode != 0:
                    print(f"{frames} {method} {case}: failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                    continue
                got = json.loads(p.stdout.strip().splitlines()[-1])
                rec = {"method": method, "case": case, "frames": frames, "model_hash": model_hash, "config": fp,
                       "machine": machine, "machine_description": machine_description(), **got}
                with open(cache, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                done[key] = rec
                print(f"{frames:3d} {method:9s} {case:28s} colour {rec['colour_ok']!s:5s} ({rec['colour_frames_ok']:.0%} of frames) "
                      f"drift {rec['drift_px']:.2f} seam {rec['seam']:+.3f} peak+{rec['peak_above_start_bytes'] / 2**20:.0f} MiB "
                      f"{rec['seconds']:.0f}s", flush=True)
                write_table(done, model, model_hash, fp, machine, stem, denoiser)
    write_table(done, model, model_hash, fp, machine, stem, denoiser)
    return 0


# (preset, projection file, fps, window in video frames, its working frames) of the windowed projection
PROJECTED = [("zeroscope-576w", "memory-projection-cuda-bf16.json", 8, 24, 24),
             ("wan2.1-t2v-1.3b", "memory-projection-wan2.1-t2v-1.3b-cuda-bf16.json", 16, 81, 21)]


def project() -> int:
    """A windowed edit's GPU peak at 5 s and 10 s: weights + the clip's held tensors (edited, source, noise,
    update, mask: linear in the frames) + the largest of one window's step, the VAE encode and the VAE
    decode of the whole clip (encode/decode and held tensors fitted linearly through the two frame counts
    the committed projection measured; the step at the window's length, as projected)."""
    GiB = 2**30
    rows = []
    for preset, fname, fps, window, window_w in PROJECTED:
        data = json.loads((RESULTS / fname).read_text())
        for plan in ("fast", "lean"):
            got = sorted((r for r in data["rows"] if r["plan"] == plan), key=lambda r: r["frames"])
            (f0, r0), (f1, r1) = (got[0]["frames"], got[0]), (got[-1]["frames"], got[-1])
            at_window = next(r for r in got if r["frames"] == window)

            def fit(key, frames):
                return r0[key] + (r1[key] - r0[key]) * (frames - f0) / (f1 - f0)

            for seconds in (5, 10):
                frames = seconds * fps + (1 if preset.startswith("wan") else 0)  # Wan: 4k+1 frames
                windowed = frames > window
                step = at_window["step_working_bytes"] if windowed else fit("step_working_bytes", frames)
                held = fit("held_bytes", frames)
                phases = {"step": step, "encode": fit("encode_working_bytes", frames), "decode": fit("decode_working_bytes", frames)}
                phase = max(phases, key=phases.get)
                peak = at_window["weights_bytes"] + held + phases[phase]
                whole = at_window["weights_bytes"] + held + max(fit("step_working_bytes", frames), phases["encode"], phases["decode"])
                rows.append({"preset": preset, "plan": plan, "seconds": seconds, "frames": frames, "window_frames": window,
                             "windowed": windowed, "peak_bytes": peak, "peak_phase": phase, "whole_clip_peak_bytes": whole})
    lines = ["# Windowed edits at 5 s and 10 s: projected GPU peak (cuda-bf16)", "",
             "From the committed projections (`" + "`, `".join(f for _, f, *_ in PROJECTED) + "`, bf16, the meta-device method "
             "of `benchmarks/project_memory.py`): weights + the clip's held tensors + the largest of one window's step, the VAE "
             "encode and the VAE decode of the whole clip. Held tensors and VAE phases are fitted linearly through the two frame "
             "counts projected there; the step is the window's own. 'whole clip' is the same without windows (the step at "
             "the clip's length, extrapolated). Command: `python -m benchmarks.long --project`.", "",
             "| model | plan | video | frames | window (frames) | projected peak GiB | phase | whole clip, no windows GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['plan']} | {r['seconds']} s | {r['frames']} | {r['window_frames'] if r['windowed'] else '-'} | "
                     f"{r['peak_bytes'] / GiB:.2f} | {r['peak_phase']} | {r['whole_clip_peak_bytes'] / GiB:.2f} |")
    lines += ["", "ZeroScope at 8 fps (its 24 frames are 3 s), Wan 2.1 at 16 fps (81 frames = 5 s: its own window). The VAE of "
              "ZeroScope runs frame by frame and Wan's causal VAE in its own temporal chunks, so their phases grow only with "
              "the frames they hold."]
    write_results("long-projection-cuda-bf16", {"rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def write_table(done: dict, model: str, model_hash: str, fp: str, machine: str, stem: str, denoiser: str) -> None:
    runs = [r for r in done.values() if r["model_hash"] == model_hash and r["config"] == fp]
    rows = []
    for frames in sorted({r["frames"] for r in runs}):
        for method in METHODS:
            rs = [r for r in runs if r["frames"] == frames and r["method"] == method]
            if not rs:
                continue
            drifts = [r["drift_px"] for r in rs if math.isfinite(r["drift_px"])]
            rows.append({"frames": frames, "method": method, "edits": len(rs),
                         "colour_success": sum(r["colour_ok"] for r in rs) / len(rs),
                         "colour_frames": float(np.mean([r["colour_frames_ok"] for r in rs])),
                         "mean_drift_px": float(np.mean(drifts)) if drifts else None,
                         "seam": float(np.mean([r["seam"] for r in rs])),
                         "peak_above_start_mib": float(np.max([r["peak_above_start_bytes"] for r in rs])) / 2**20,
                         "seconds": float(np.median([r["seconds"] for r in rs])),
                         "forward": float(np.mean([r["evaluations"]["forward"] for r in rs]))})
    base = next((r for r in rows if r["frames"] == WINDOW), None)
    _, on = runs_machines(runs)
    meta = {"machine": machine, "machine_description": on, "model": repo_relative(model), "denoiser": denoiser,
            "model_hash": model_hash, "config_fingerprint": fp, "window": WINDOW, "cases": [f"{a} {b} -> {c}" for a, b, c in CASES]}
    lines = [f"# Long clips: windows, independent chunks and the whole clip ({machine})", "",
             f"Machine: {meta['machine_description']}. Model: `{meta['model']}` ({denoiser} sha256 {model_hash}). "
             f"fastdm-edit's defaults (config {fp}), automatic mask; {len(CASES)} colour edits per length "
             f"({'; '.join(meta['cases'])}) on clips whose object goes right and back. Command: "
             f"`python -m benchmarks.long --model {stem.split('-')[1] if 'dit' not in stem else 'shapes-dit'}`.", "",
             "| frames | method | edits | colour in every frame | frames with the colour | mean drift (px) | seam | "
             "peak above start (MiB) | vs 8 frames | forward evals | s / edit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['peak_above_start_mib'] / base['peak_above_start_mib']:.2f}x" if base and base["peak_above_start_mib"] else "-"
        drift = "-" if r["mean_drift_px"] is None else f"{r['mean_drift_px']:.2f}"
        lines.append(f"| {r['frames']} | {r['method']} | {r['edits']} | {r['colour_success']:.0%} | {r['colour_frames']:.0%} | "
                     f"{drift} | {r['seam']:+.3f} | {r['peak_above_start_mib']:.0f} | {rel} | {r['forward']:.0f} | {r['seconds']:.0f} |")
    lines += ["", "seam: border change / inside change of the edit minus the same of the source (frames 8k-1 -> 8k are the "
              "chunks' borders); 0 = no seam. Peak above start: RSS high-water mark during the edit minus RSS when it began "
              "(the model and libraries excluded), the largest over the cases."]
    write_results(stem, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
