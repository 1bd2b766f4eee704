"""Did the shapes model learn? Sample every colour x shape with our DDIM + CFG sampler and classify.

For each of the 7 x 3 colour/shape pairs, ``--per-pair`` samples (directions cycle through the
four), each classified frame by frame with the shapes metrics; a sample counts for colour (shape)
when the named colour (shape) is the majority over its frames. Writes
``results/shapes-model-<machine>.{json,md}`` for the bundled UNet model and
``results/shapes-model-<model folder name>-<machine>.{json,md}`` for any other (``--model shapes-dit``),
and optionally a contact sheet PNG.

    python -m benchmarks.shapes_model [--model DIR|NAME] [--per-pair 4] [--steps 50]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    machine_description,
    machine_name,
    model_stem,
    repo_relative,
    write_results,
)
from fastdm.toyworld.metrics import video_summary
from fastdm.toyworld.world import COLOURS, DIRECTIONS, SHAPES, prompt


def majority(xs):
    c = collections.Counter(x for x in xs if x is not None)
    return c.most_common(1)[0][0] if c else None


def main() -> None:
    import torch

    from fastdm.backbone import load_backbone, resolve_model
    from fastdm.sampling import ddim_sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or bundled name (shapes, shapes-dit); default shapes")
    ap.add_argument("--per-pair", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0: deterministic, 1: ancestral)")
    ap.add_argument("--clip-x0", action="store_true", help="clamp each predicted clean video to [-1, 1]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sheet", default=None, help="write a PNG contact sheet (first frame of every sample)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    bb = load_backbone(model)
    dirs = list(DIRECTIONS)
    rows, firsts = [], []
    t0 = time.time()
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(args.per_pair):
                d = dirs[k % 4]
                vid = ddim_sample(bb, prompt(colour, shape, d), steps=args.steps, guidance_scale=args.guidance_scale, seed=k,
                                  eta=args.eta, clip_x0=args.clip_x0)
                s = video_summary(vid)
                rows.append({"colour": colour, "shape": shape, "direction": d, "seed": k,
                             "got_colour": majority(s["colours"]), "got_shape": majority(s["shapes"])})
                firsts.append(vid[0])
    n = len(rows)
    colour_rate = sum(r["got_colour"] == r["colour"] for r in rows) / n
    shape_rate = sum(r["got_shape"] == r["shape"] for r in rows) / n
    per_colour = {c: sum(r["got_colour"] == c for r in rows if r["colour"] == c) / sum(r["colour"] == c for r in rows) for c in COLOURS}
    per_shape = {s: sum(r["got_shape"] == s for r in rows if r["shape"] == s) / sum(r["shape"] == s for r in rows) for s in SHAPES}
    machine = machine_name()
    meta = {"machine": machine, "machine_description": machine_description(), "model": repo_relative(model), "samples": n,
            "ddim_steps": args.steps, "guidance_scale": args.guidance_scale, "eta": args.eta, "clip_x0": args.clip_x0, "seconds": round(time.time() - t0, 1)}
    md = [f"# Shapes model: samples classified ({machine})", "",
          f"Machine: {meta['machine_description']}. Model: `{meta['model']}`. {n} samples ({args.per_pair} per colour x shape),"
          f" DDIM {args.steps} steps, eta {args.eta}, CFG {args.guidance_scale},"
          f" x0 clamp {'on' if args.clip_x0 else 'off'}; {meta['seconds']:.0f} s.", "",
          f"Named colour (majority of frames): **{colour_rate:.0%}**; named shape: **{shape_rate:.0%}**.", "",
          "| colour | hit rate |", "|---|---|", *[f"| {c} | {v:.0%} |" for c, v in per_colour.items()], "",
          "| shape | hit rate |", "|---|---|", *[f"| {s} | {v:.0%} |" for s, v in per_shape.items()], ""]
    write_results(f"{model_stem('shapes-model', model)}-{machine}", {"meta": meta, "colour_rate": colour_rate, "shape_rate": shape_rate,
                                              "per_colour": per_colour, "per_shape": per_shape, "samples": rows}, "\n".join(md))
    if args.sheet:
        import imageio.v3 as iio

        per_row = len(SHAPES) * args.per_pair
        grid = np.stack(firsts).reshape(len(COLOURS), per_row, *firsts[0].shape)
        sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in grid], axis=0)
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(args.sheet, np.kron(sheet, np.ones((2, 2, 1), np.uint8)))
    print("\n".join(md))


if __name__ == "__main__":
    main()
