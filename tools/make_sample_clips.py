"""Generate the sample clips bundled with fastdm (a coloured shape moving on black).

    python tools/make_sample_clips.py [--out fastdm/assets/clips]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdm.io import write_video  # noqa: E402
from fastdm.toyworld.world import render_back_and_forth, render_clip  # noqa: E402

CLIPS = [
    ("red_circle_right", "red", "circle", "right"),
    ("green_square_down", "green", "square", "down"),
    ("blue_triangle_left", "blue", "triangle", "left"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "fastdm" / "assets" / "clips"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, colour, shape, direction in CLIPS:
        frames = render_clip(colour, shape, direction, size=args.size, frames=args.frames, radius=7, speed=2.0, start=None)
        write_video(out / f"{name}.gif", frames, fps=8)
        print("wrote", out / f"{name}.gif")
    # a long clip, four times the bundled models' 8 frames: the object goes right and back
    write_video(out / "red_circle_long.gif", render_back_and_forth("red", "circle", 32, size=args.size), fps=8)
    print("wrote", out / "red_circle_long.gif")


if __name__ == "__main__":
    main()
