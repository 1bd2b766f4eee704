"""The shapes-world edit suite: generated cases, their clips, box masks, and the weight-free scores
every quality benchmark uses (``benchmarks/quality.py``, ``benchmarks/cost.py``, the cascade rows).

In the installed package so that tests and benchmarks share one copy."""

from __future__ import annotations

import numpy as np

from .world import COLOURS, DIRECTIONS, SHAPES, prompt, render_clip
from .metrics import centroid_drift, object_mask, video_summary


def build_suite(seed: int = 0, n_colour: int = 12, n_shape: int = 6, n_both: int = 6, size: int = 32, frames: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    cases = []
    for kind, count in (("colour", n_colour), ("shape", n_shape), ("both", n_both)):
        for i in range(count):
            colour, shape, direction = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(DIRECTIONS)))
            t_colour = colour if kind == "shape" else str(rng.choice([c for c in COLOURS if c != colour]))
            t_shape = shape if kind == "colour" else str(rng.choice([s for s in SHAPES if s != shape]))
            cases.append(dict(
                id=f"{kind}-{i:02d}", kind=kind, colour=colour, shape=shape, direction=direction,
                target_colour=t_colour, target_shape=t_shape,
                radius=float(rng.uniform(5.0, 7.0)), speed=float(rng.uniform(1.5, 2.0)), size=size, frames=frames,
                source_prompt=prompt(colour, shape, direction), target_prompt=prompt(t_colour, t_shape, direction),
            ))
    return cases


RADII = (5.0, 5.5, 6.0, 6.5, 7.0)
SPEEDS = (1.5, 1.75, 2.0)
HALVES = ("choose", "report")


def build_full_suite(size: int = 32, frames: int = 8, shape_colours: int = 2, variant: int = 0) -> list[dict]:
    """The suite settings are chosen and reported on, fixed (no random draw): every ordered pair of the seven colours
    once (42 colour edits) and every ordered pair of the three shapes in ``shape_colours`` colours (12 shape edits),
    shapes, directions, radii and speeds rotating over them (counters of co-prime lengths, so no two rotate
    together). Each case carries its ``half`` (:func:`suite_half`): a fixed rule, a regular tournament on the colours,
    so both halves have the same make-up: a colour edit a -> b is in the *choose* half when b follows a by 1, 2 or 3
    places around ``COLOURS`` (mod 7), its reverse b -> a in the *report* half; each half holds all 21 colour pairs,
    one direction each, and every colour is the source of 3 edits and the target of 3 in each half (ordering by
    list position instead would put the later colours, magenta, cyan, white, mostly among the choose half's
    targets). Shape edits alike (b follows a by 1 place mod 3: choose).

    ``variant`` > 0 draws fresh clips of the same make-up and the same halves: every counter is shifted (the colour
    edits' shape, every case's direction, radius and speed, the shape edits' colour), so each case of variant v
    differs from variant 0's in all of them (ARCHITECTURE.md, rule 7: variant 1's report half is the third round's
    fresh report suite). Variant 0 is the suite as it always was."""
    if not isinstance(variant, int) or variant < 0:
        raise ValueError(f"variant {variant!r}: a whole number >= 0")
    colours, dirs = list(COLOURS), list(DIRECTIONS)
    cases = []

    def add(kind, i, colour, shape, t_colour, t_shape, half):
        direction = dirs[(i // 3 + variant) % len(dirs)]
        cases.append(dict(id=f"{kind}-{colour}-{shape}-to-{t_colour}-{t_shape}", kind=kind, half=half, colour=colour, shape=shape,
                          direction=direction, target_colour=t_colour, target_shape=t_shape, radius=RADII[(i + 2 * variant) % len(RADII)],
                          speed=SPEEDS[(i // 2 + variant) % len(SPEEDS)], size=size, frames=frames,
                          source_prompt=prompt(colour, shape, direction), target_prompt=prompt(t_colour, t_shape, direction)))

    i = 0
    for a, ca in enumerate(colours):
        for b, cb in enumerate(colours):
            if a != b:
                shape = SHAPES[(a + b + variant) % len(SHAPES)]
                add("colour", i, ca, shape, cb, shape,
                    HALVES[(b - a) % len(colours) > len(colours) // 2])
                i += 1
    for k in range(shape_colours):
        for a, sa in enumerate(SHAPES):
            for b, sb in enumerate(SHAPES):
                if a != b:
                    colour = colours[(2 * k + a + b + 3 * variant) % len(colours)]
                    add("shape", i, colour, sa, colour, sb, HALVES[(b - a) % len(SHAPES) != 1])
                    i += 1
    return cases


def suite_half(cases: list[dict], half: str) -> list[dict]:
    """The ``choose`` or ``report`` half of :func:`build_full_suite`'s cases."""
    if half not in HALVES:
        raise ValueError(f"half {half!r}: choose or report")
    return [c for c in cases if c["half"] == half]


def render_case(case: dict) -> np.ndarray:
    return render_clip(case["colour"], case["shape"], case["direction"], size=case["size"], frames=case["frames"],
                       radius=case["radius"], speed=case["speed"])


def box_mask(clip: np.ndarray, margin: int = 2) -> np.ndarray:
    """Per-frame bounding boxes of the source object, grown by ``margin`` px: (F, H, W) float32."""
    out = np.zeros(clip.shape[:3], np.float32)
    for i, f in enumerate(clip):
        ys, xs = np.nonzero(object_mask(f))
        if len(xs):
            out[i, max(0, ys.min() - margin) : ys.max() + margin + 1, max(0, xs.min() - margin) : xs.max() + margin + 1] = 1
    return out


def area_kept(source: np.ndarray, edit: np.ndarray, low: float = 0.5, high: float = 2.0) -> bool:
    """The edited object's area is within ``low``-``high`` times the source object's in every frame."""
    for a, b in zip(source, edit):
        sa, ea = object_mask(a).sum(), object_mask(b).sum()
        if sa == 0 or not (low * sa <= ea <= high * sa):
            return False
    return True


def background_change(source: np.ndarray, edit: np.ndarray, grow: int = 3) -> float:
    """Mean absolute change (0-255) outside the source object grown by ``grow`` px, over all frames."""
    import cv2

    kernel = np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)
    outside = np.stack([cv2.dilate(object_mask(f).astype(np.uint8), kernel) == 0 for f in source])
    diff = np.abs(edit.astype(np.float32) - source.astype(np.float32)).mean(-1)
    return float(diff[outside].mean()) if outside.any() else 0.0


def score(case: dict, source: np.ndarray, edit: np.ndarray) -> dict:
    from fastdm.metrics import frame_consistency, motion_fidelity

    s = video_summary(edit)
    mf = motion_fidelity(source, edit)
    shape_hits = sum(x == case["target_shape"] for x in s["shapes"])
    solid_hits = sum(x == case["target_shape"] and ok for x, ok in zip(s["shapes"], s["solid"]))
    return {
        "colour_ok": all(c == case["target_colour"] for c in s["colours"]),
        "colour_frames": s["colours"],
        "shape_ok": shape_hits * 2 > len(edit),
        # the shape read only on solid frames (ARCHITECTURE.md rule 12): most frames solid *and* the target shape
        "shape_solid_ok": solid_hits * 2 > len(edit),
        "solid_frames": sum(s["solid"]) / len(edit),
        "shape_frames": s["shapes"],
        "drift_px": centroid_drift(source, edit),
        "motion_fidelity": mf["fidelity"],
        "flow_epe_px": mf["epe"],
        "frame_consistency": frame_consistency(edit),
        "area_kept": area_kept(source, edit),
        "background_change": background_change(source, edit),
    }
