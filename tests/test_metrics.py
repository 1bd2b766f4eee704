"""Metrics on clips with known answers: a clip against itself, a shifted clip, a recoloured clip."""

import math

import numpy as np
import pytest

from fastdm.toyworld.metrics import SOLID, centroid, centroid_drift, colour_of, object_mask, shape_of, solid_share, video_summary
from fastdm.metrics import frame_consistency, motion_fidelity, optical_flow
from fastdm.toyworld.world import COLOURS, SHAPES, render_clip, sample_clip


@pytest.fixture(scope="module")
def clip():
    return render_clip("red", "circle", "right", size=32, frames=8, radius=6, speed=2)


def test_clip_against_itself(clip):
    assert motion_fidelity(clip, clip) == {"fidelity": 1.0, "epe": 0.0}
    assert centroid_drift(clip, clip) == 0.0
    assert frame_consistency(clip) > 0.99


def test_recoloured_clip_keeps_motion_and_changes_colour(clip):
    blue = render_clip("blue", "circle", "right", size=32, frames=8, radius=6, speed=2)
    mf = motion_fidelity(clip, blue)
    assert mf["fidelity"] > 0.95 and mf["epe"] < 0.2
    assert centroid_drift(clip, blue) < 1e-6
    assert video_summary(blue)["colours"] == ["blue"] * 8


def test_shifted_clip_has_known_drift_and_lower_fidelity(clip):
    shifted = np.roll(clip, 3, axis=2)  # 3 px to the right; the path stays inside the frame
    assert centroid_drift(clip, shifted) == pytest.approx(3.0, abs=1e-6)
    assert motion_fidelity(clip, shifted)["fidelity"] < 0.9


def test_flow_measures_the_known_speed(clip):
    flow = optical_flow(clip)
    moving = np.linalg.norm(flow, axis=-1) > 0.5
    dx, dy = flow[moving].mean(0)
    assert dx == pytest.approx(2.0, abs=0.3) and abs(dy) < 0.2


def test_opposite_motion_scores_negative(clip):
    left = render_clip("red", "circle", "left", size=32, frames=8, radius=6, speed=2)
    assert motion_fidelity(clip, left)["fidelity"] < 0


def test_flicker_lowers_consistency(clip):
    flicker = clip.copy()
    flicker[1::2] = flicker[1::2] // 3
    assert frame_consistency(flicker) < frame_consistency(clip) - 0.01


@pytest.mark.parametrize("colour", list(COLOURS))
@pytest.mark.parametrize("shape", SHAPES)
def test_colour_and_shape_classifiers_on_rendered_objects(colour, shape):
    f = render_clip(colour, shape, "up", size=32, frames=1, radius=6)[0]
    assert colour_of(f) == colour and shape_of(f) == shape
    cx, cy = centroid(f)
    assert math.dist((cx, cy), (16, 16)) < 1.0 if shape != "triangle" else abs(cx - 16) < 0.5


def test_classifiers_on_random_training_clips():
    rng = np.random.default_rng(123)
    ok_c = ok_s = n = 0
    for _ in range(60):
        c, _, meta = sample_clip(rng)
        s = video_summary(c)
        ok_c += sum(x == meta["colour"] for x in s["colours"])
        ok_s += sum(x == meta["shape"] for x in s["shapes"])
        n += len(c)
    assert ok_c == n and ok_s / n > 0.97


def test_solidity_keeps_blurred_and_noisy_objects_and_refuses_speckled_ones():
    """The calibration of SOLID (ARCHITECTURE.md rule 12), on fresh renders of every colour, shape and size: blurred
    (sigma 1.5) and noisy (sigma 40) objects stay solid; with 10 % of the object's pixels replaced by random palette
    colours, nearly all still solid; with 30 %, at most a fifth; with 50 %, next to none. A wholly speckled
    object is solid in no frame."""
    import cv2

    rng = np.random.default_rng()
    palette = np.array(list(COLOURS.values()), np.uint8)
    shares = {k: [] for k in ("clean", "blur", "noise", "speckle10", "speckle30", "speckle50")}
    for colour in COLOURS:
        for shape in SHAPES:
            for radius in (5, 7, 9):
                f = render_clip(colour, shape, "right", size=32, frames=1, radius=radius, speed=0)[0]
                m = object_mask(f)

                def speckle(p):
                    g = f.copy()
                    sel = m & (rng.random(m.shape) < p)
                    g[sel] = palette[rng.integers(0, len(palette), int(sel.sum()))]
                    return g

                shares["clean"].append(solid_share(f))
                shares["blur"].append(solid_share(cv2.GaussianBlur(f, (0, 0), 1.5)))
                shares["noise"].append(solid_share(np.clip(f + rng.normal(0, 40, f.shape), 0, 255).astype(np.uint8)))
                for p in (10, 30, 50):
                    shares[f"speckle{p}"].append(solid_share(speckle(p / 100)))
    assert min(shares["clean"]) == 1.0 and min(shares["blur"]) >= 0.9 and min(shares["noise"]) >= 0.9
    solid = {k: np.mean(np.asarray(v) >= SOLID) for k, v in shares.items()}  # (over 63 objects, fresh speckle each run)
    assert solid["speckle10"] >= 0.9 and solid["speckle30"] <= 0.2 and solid["speckle50"] <= 0.05
    clip = render_clip("yellow", "triangle", "right", size=32, frames=4, radius=7, speed=1)
    for f in clip:  # every pixel of each frame's own object a random palette colour
        m = object_mask(f)
        f[m] = palette[rng.integers(0, len(palette), int(m.sum()))]
    s = video_summary(clip)
    assert s["solid"] == [False] * 4


def test_empty_frame_has_no_object():
    black = np.zeros((2, 16, 16, 3), np.uint8)
    assert video_summary(black)["colours"] == [None, None]
    assert centroid_drift(black, black) == math.inf
