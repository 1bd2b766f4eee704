"""Step by step through one edit of the full suite: the object's area over the source's (mean over frames), the
frames already at the target colour, the object's fill ratio and the frames read as the target shape after every
step, so a halo (the target painted around the object) shows when it comes and whether the later steps take it back
(ARCHITECTURE.md, "The automatic mask", graded), and a shape edit when it is read as finished.

    python -m benchmarks.area_trace --case colour-red-triangle-to-blue-triangle --set lr=3.6 --set soft_mask=0,1

Each ``--set NAME=V1,V2`` value is one run (one setting varied at a time); the edit is otherwise the
benchmark schedule ``sgd-anneal-cos-lr3.2-16`` (bundled UNet unless ``--model shapes-dit``; the case from
``build_full_suite(variant=--variant)``; automatic mask, seed 0). Writes
``results/area-trace-<case>[-<model>][-v<variant>][-<tag>]-<machine>.{json,md}``, with ``--png`` also a picture of
the source and each run's last frames (4x, one row each) beside them.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine_description, machine_name, write_results
from benchmarks.suite import frames_of, over_builtins, parse_setting
from fastdm.toyworld.metrics import colour_of, fill_ratio, object_mask, shape_of, solid
from fastdm.toyworld.suite import build_full_suite, render_case, score

BASE = dict(steps=16, t_schedule="anneal", lr=3.2, lr_schedule="cosine")


def trace(pipe, case: dict, settings: dict) -> dict:
    clip = render_case(case)
    src = [max(int(object_mask(f).sum()), 1) for f in clip]
    run = pipe.prepare(clip, case["source_prompt"], case["target_prompt"], mask="auto", seed=0, **over_builtins(pipe, settings))
    steps = []
    while not run.done:
        run.step()
        frames = frames_of(pipe.backbone, run.x)
        steps.append({"step": run.step_index, "t": run.last_t, "lr": run.opt.param_groups[0]["lr"],
                      "area_ratio": float(np.mean([object_mask(f).sum() / a for f, a in zip(frames, src)])),
                      "target_frames": sum(colour_of(f) == case["target_colour"] for f in frames),
                      "fill_ratio": float(np.mean([fill_ratio(f) or 0.0 for f in frames])),
                      "target_shape_frames": sum(shape_of(f) == case["target_shape"] for f in frames),
                      "solid_frames": sum(solid(f) for f in frames)})
    # (the whole score, motion fidelity included, once at the end, not after every step)
    final = {k: v for k, v in score(case, clip, frames).items() if not k.endswith("_frames")}
    return {"settings": settings, "steps": steps, "final": final, "frames": frames, "source": clip}


def main(argv: list[str] | None = None) -> int:
    from fastdm import DreamMotionPipeline
    from fastdm.backbone import resolve_model
    from fastdm.errors import FastDMError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, help="a case id of build_full_suite()")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=V1[,V2...]",
                    help="an EditConfig setting; a comma list runs once per value (the last --set with a list)")
    ap.add_argument("--model", default="shapes", choices=("shapes", "shapes-dit"), help="the bundled UNet or transformer")
    ap.add_argument("--variant", type=int, default=0, help="the case from build_full_suite(variant=N)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="", help="a name added to the results' file names (two traces of one case)")
    ap.add_argument("--png", action="store_true", help="also a picture: the source and each run's last frames")
    args = ap.parse_args(argv)
    if args.tag and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        raise SystemExit(f"error: --tag {args.tag!r}: letters, digits, '.', '_' and '-' only (it names files in results/)")
    cases = {c["id"]: c for c in build_full_suite(variant=args.variant)}
    if args.case not in cases:
        raise SystemExit(f"error: no case {args.case!r} in build_full_suite(variant={args.variant}); e.g. {next(iter(cases))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    fixed, varied = dict(BASE), ("", [None])
    for item in args.set:
        try:
            name, vals = parse_setting(item, lists=True, reserved=())
        except FastDMError as e:  # one line, no traceback
            raise SystemExit(f"error: {e}") from None
        if len(vals) > 1:
            varied = (name, vals)
        else:
            fixed[name] = vals[0]
    pipe = DreamMotionPipeline.from_pretrained(resolve_model(args.model))
    runs = []
    for v in varied[1]:
        settings = dict(fixed, **({varied[0]: v} if varied[0] else {}))
        t0 = time.perf_counter()
        runs.append({**trace(pipe, cases[args.case], settings), "seconds": time.perf_counter() - t0})
    machine = machine_name()
    flags = (f" --model {args.model}" if args.model != "shapes" else "") + (f" --variant {args.variant}" if args.variant else "")
    lines = [f"# Area trace: {args.case} ({args.model}, {machine})", "",
             f"`python -m benchmarks.area_trace --case {args.case}{flags} " + " ".join(f"--set {s}" for s in args.set) +
             (f" --tag {args.tag}" if args.tag else "") + (" --png" if args.png else "") + "`; "
             f"{machine_description()}. Per step: the object's area over the source's (mean over frames), frames at the "
             "target colour, the object's fill ratio (its area over its box's, mean over frames: square 1, circle 0.785, "
             "triangle 0.5), frames read as the target shape, and frames whose object is solid (at least 80 % of its core "
             "pixels its colour; ARCHITECTURE.md rule 12).", ""]
    for r in runs:
        f = r["final"]
        lines += [f"## {r['settings']}", "",
                  "| step | t | lr | area ratio | frames at target colour | fill ratio | frames at target shape | solid frames |",
                  "|---|---|---|---|---|---|---|---|",
                  *[f"| {s['step']} | {s['t']} | {s['lr']:.2f} | {s['area_ratio']:.2f} | {s['target_frames']} | "
                    f"{s['fill_ratio']:.2f} | {s['target_shape_frames']} | {s['solid_frames']} |" for s in r["steps"]],
                  "", f"End: colour {f['colour_ok']}, shape {f['shape_ok']} (on solid frames: {f['shape_solid_ok']}), area kept "
                  f"{f['area_kept']}, drift {f['drift_px']:.2f} px.", ""]
    stem = (f"area-trace-{args.case}" + (f"-{args.model}" if args.model != "shapes" else "") +
            (f"-v{args.variant}" if args.variant else "") + (f"-{args.tag}" if args.tag else ""))
    if args.png:
        import imageio.v3 as iio

        rows = [runs[0]["source"]] + [r["frames"] for r in runs]
        picture = np.concatenate([np.concatenate(list(x), axis=1) for x in rows], axis=0)
        png = RESULTS / f"{stem}-{machine}.png"
        RESULTS.mkdir(parents=True, exist_ok=True)
        iio.imwrite(png.with_suffix(".tmp.png"), np.kron(picture, np.ones((4, 4, 1), np.uint8)))
        os.replace(png.with_suffix(".tmp.png"), png)  # (atomic)
        lines += [f"Picture: `{stem}-{machine}.png`: the source, then each run's last frames, one row each, in the order above.", ""]
    for r in runs:
        r.pop("frames"), r.pop("source")
    write_results(f"{stem}-{machine}", {"case": args.case, "model": args.model, "variant": args.variant, "runs": runs, "machine": machine,
                                        "machine_description": machine_description()}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
