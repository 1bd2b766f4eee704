"""Choose the shapes cascade's upscale settings by measurement: super-resolve known clips.

The quality suite's source clips are rendered at 32x32 and at 64x64 (the same object, path and
speed, doubled); the upscale stage turns the 32x32 clip into 64x64 under each setting (noise
level of the low-res conditioning x guidance scale), and the result is compared with the true
64x64 render: PSNR, the suite's colour and shape checks, centroid drift (px at 64), frame
consistency. Bicubic and bilinear upsampling of the same clip are the baselines. No edit is
involved: this isolates the upscale model, so the settings picked here are the ones
``fastdm/assets/cascades/shapes.json`` ships.

    python -m benchmarks.upscale_settings [--cases 8] [--noise-levels 0,50,100,200] [--guidance 1,3,5] [--strengths 1,0.6] [--steps 50]

Writes ``results/upscale-settings-<machine>.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import machine_description, machine_name, repo_relative, write_results


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def scores(case: dict, truth: np.ndarray, out: np.ndarray) -> dict:
    from fastdm.toyworld.metrics import centroid_drift, video_summary
    from fastdm.metrics import frame_consistency

    s = video_summary(out)
    return {"psnr": psnr(out, truth), "colour_ok": all(c == case["colour"] for c in s["colours"]),
            "shape_ok": sum(x == case["shape"] for x in s["shapes"]) * 2 > len(out),
            "drift_px": centroid_drift(truth, out), "frame_consistency": frame_consistency(out)}


def summarize(rows: list[dict]) -> dict:
    return {"clips": len(rows), "psnr": float(np.mean([r["psnr"] for r in rows])),
            "colour_ok": float(np.mean([r["colour_ok"] for r in rows])), "shape_ok": float(np.mean([r["shape_ok"] for r in rows])),
            "drift_px": float(np.mean([r["drift_px"] for r in rows])),
            "frame_consistency": float(np.mean([r["frame_consistency"] for r in rows]))}


def main() -> None:
    import torch
    import torch.nn.functional as F

    from benchmarks.suite import bicubic, build_suite, render_case, render_case_at
    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.cascade.spec import load_cascade
    from fastdm.cascade.stages import run_upscale

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cascade", default="shapes")
    ap.add_argument("--cases", type=int, default=8, help="the first N suite cases (their source clips)")
    ap.add_argument("--noise-levels", default="0,50,100,200")
    ap.add_argument("--guidance", default="1,3,5")
    ap.add_argument("--strengths", default="1", help="img2img strengths (1: every timestep)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the cascade file's)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    up = next(st for st in load_cascade(args.cascade).stages if st.kind == "upscale")
    info = check_stage_folder(up.model, "upscale", f"--cascade {args.cascade}: {up.label}")
    model = load_stage_model(info, up.label, device=torch.device("cpu"), dtype=torch.float32)
    cases = build_suite()[: args.cases]
    clips = [(c, render_case(c), render_case_at(c, 2)) for c in cases]
    table, timing = {}, {}

    def bilinear(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        y = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
        return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    table["bicubic"] = summarize([scores(c, hi, bicubic(lo, (hi.shape[2], hi.shape[1]))) for c, lo, hi in clips])
    table["bilinear"] = summarize([scores(c, hi, bilinear(lo)) for c, lo, hi in clips])
    steps = args.steps or up.settings["steps"]
    grid = [(f"noise {level}, guidance {g:g}" + (f", strength {st:g}" if st < 1 else ""),
             {"noise_level": level, "guidance_scale": g, "strength": st})
            for level in (int(v) for v in args.noise_levels.split(","))
            for g in (float(v) for v in args.guidance.split(","))
            for st in (float(v) for v in args.strengths.split(","))]
    # the shipped settings with the chain started from pure noise (what sample_conditioned did before it
    # started from the noised upsampled clip)
    grid.append(("shipped settings, pure-noise start", {"start": "noise"}))
    for name, change in grid:
        settings = {**up.settings, "steps": steps, **change}
        t0 = time.time()
        rows = [scores(c, hi, run_upscale(model, lo, c["source_prompt"], settings)) for c, lo, hi in clips]
        table[name] = summarize(rows)
        timing[name] = (time.time() - t0) / len(clips)
        print(name, table[name], f"({timing[name]:.1f} s/clip)", flush=True)
    meta = {"machine": machine_name(), "machine_description": machine_description(), "model": repo_relative(up.model),
            "cases": [c["id"] for c in cases], "steps": steps, "shipped": {k: up.settings[k] for k in ("noise_level", "guidance_scale", "strength", "start")}}
    lines = [f"# Upscale settings for `--cascade {args.cascade}` ({meta['machine']})", "",
             f"Machine: {meta['machine_description']}. Model: `{meta['model']}`, {steps} DDIM steps. Clips: the source clips of "
             f"{len(cases)} suite cases ({', '.join(meta['cases'])}), 32x32 -> 64x64, compared with the same clip rendered at 64x64.",
             f"Shipped in the cascade file when this ran: noise level {meta['shipped']['noise_level']}, guidance "
             f"{meta['shipped']['guidance_scale']:g}, strength {meta['shipped']['strength']:g}, start "
             f"{meta['shipped']['start']!r}. The chain starts from the upsampled clip noised to the first timestep "
             "unless the row says pure-noise start.", "",
             "| upsampling | PSNR (dB) | colour kept | shape kept | drift (px at 64) | frame consistency | s / clip |",
             "|---|---|---|---|---|---|---|"]
    for name, s in table.items():
        t = f"{timing[name]:.1f}" if name in timing else "-"
        lines.append(f"| {name} | {s['psnr']:.2f} | {s['colour_ok']:.0%} | {s['shape_ok']:.0%} | {s['drift_px']:.2f} | "
                     f"{s['frame_consistency']:.3f} | {t} |")
    md = "\n".join(lines) + "\n"
    write_results(f"upscale-settings-{machine_name()}", {"meta": meta, "table": table, "seconds_per_clip": timing}, md)
    print(md)


if __name__ == "__main__":
    main()
