"""Forward FLOPs of a video transformer preset (Wan, LTX-Video) (exact architecture, meta device, no weights), beside the counted
figures in ../shared/reference (flops.md, video-backbones.md):

    python -m benchmarks.forward_flops                                   # Wan 2.1 T2V 1.3B, 33 and 81 frames
    python -m benchmarks.forward_flops --preset wan2.2-t2v-a14b --frames 33,81 --out benchmarks/results

``torch.utils.flop_counter`` on one forward at batch 1 and the preset's native size (a multiply-add is 2 FLOPs;
matmuls and attention). With ``--out`` it writes ``forward-flops-<preset>.{json,md}``; a FLOP count does not
depend on the machine that counts it (the file records it anyway)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdm.bench.presets import PRESETS, build_backbone


def count(preset: str, frames_list: list[int], sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    bb = build_backbone(preset, "meta", torch.bfloat16)
    rows = []
    for size, frames in [(sz, f) for sz in (sizes or [PRESETS[preset]["size"]]) for f in frames_list]:
        shape = bb.working_shape(frames, size)
        x = torch.zeros(shape, device="meta", dtype=torch.bfloat16)
        text = torch.zeros(1, *bb.text_embedding_shape(), device="meta", dtype=torch.bfloat16)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            bb.denoiser_forward(x, torch.full((1,), 500, device="meta"), text)
        rows.append({"preset": preset, "frames": frames, "size": f"{size[0]}x{size[1]}", "working_shape": list(shape),
                     "forward_flops": int(fc.get_total_flops()), "experts": getattr(bb, "experts", 1)})
        print(f"{preset} frames {frames}: working {tuple(shape)}, forward {rows[-1]['forward_flops'] / 1e12:.1f} TFLOP", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--frames", default="33,81")
    ap.add_argument("--sizes", default=None, help="WxH[,WxH...] (default: the preset's size)")
    ap.add_argument("--out", default=None, help="write forward-flops-<preset>.{json,md} into this folder")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in sz.split("x")) for sz in args.sizes.split(",")] if args.sizes else None
    rows = count(args.preset, [int(f) for f in args.frames.split(",")], sizes)
    if args.out:
        from fastdm.io.atomic import write_json_atomic, write_text_atomic
        from fastdm.machine import machine_description, machine_name

        out = Path(args.out)
        meta = {"name": f"forward-flops-{args.preset}", "machine": machine_name("cpu"), "machine_description": machine_description("cpu"), "device": "meta",
                "dtype": "bf16", "command": f"python -m benchmarks.forward_flops --preset {args.preset} --frames {args.frames}"
                + (f" --sizes {args.sizes}" if args.sizes else "")}
        write_json_atomic(out / f"forward-flops-{args.preset}.json", {"meta": meta, "rows": rows})
        md = [f"# Forward FLOPs: {args.preset}", "", f"`{meta['command']} --out {args.out}` (meta device, exact architecture, batch 1; "
              "`torch.utils.flop_counter`, a multiply-add = 2 FLOPs). Counted on: " + meta["machine_description"] + ".", "",
              "| frames | size | working tensor | TFLOP / forward |", "|---|---|---|---|"]
        md += [f"| {r['frames']} | {r['size']} | {tuple(r['working_shape'])} | {r['forward_flops'] / 1e12:.1f} |" for r in rows]
        if rows and rows[0]["experts"] > 1:
            md += ["", f"Each forward runs one of the {rows[0]['experts']} experts (one architecture): the figure is per forward, "
                   "whichever expert serves the step's timestep."]
        write_text_atomic(out / f"forward-flops-{args.preset}.md", "\n".join(md) + "\n")
        print(f"wrote {out / f'forward-flops-{args.preset}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
