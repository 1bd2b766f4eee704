"""Metrics of the shapes world (one coloured object on black): object mask, centroid, colour, shape.

* object mask: pixels farther than ``THRESHOLD`` (largest channel difference) from the
  background colour, largest connected component only; the background colour is the median of
  the frame's border pixels (black for the renderer's clips; a model's samples or edits may
  tint it);
* centroid per frame: coverage-weighted (antialiased edges count by their brightness);
* colour: the object's mean colour, normalized by its brightest channel, matched to the nearest
  vocabulary colour;
* shape: fill ratio = object area / sub-pixel bounding-box area (a column or row spans its
  largest coverage), nearest of triangle 0.5, circle pi/4,
  square 1.0 (the renderer's square is axis-aligned, its triangle upright);
* solid: at least ``SOLID`` of the object's core pixels are, each on its own, the object's colour. A speckled
  object (pixels of many colours, as the bundled transformer's edits are) has no defined outline: its fill
  ratio falls with the speckle, not with the shape, and reads as a triangle (ARCHITECTURE.md rule 12).
  ``SOLID`` was set on renders before any edit was read with it: clean, blurred (sigma 1.5) and noisy
  (sigma 40) renders of every colour, shape and size stay >= 0.94; with 10 % of the object's pixels replaced by
  random palette colours 0.91 on average (the lowest of 63 objects 0.75-0.84 over ten draws); with 30 % 0.72
  (3-8 % of the objects >= 0.8); with 50 % 0.51, none >= 0.8 (``tests/test_metrics.py``).
"""

from __future__ import annotations

import math

import numpy as np

from .world import COLOURS

THRESHOLD = 64
SOLID = 0.8
FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
_VOCAB = {name: np.array(rgb, np.float32) / 255.0 for name, rgb in COLOURS.items()}
_VOCAB_NAMES, _VOCAB_RGB = np.asarray(list(_VOCAB)), np.stack(list(_VOCAB.values()))  # (solid_share, per pixel)


def background(frame: np.ndarray) -> np.ndarray:
    """(3,) float: the median colour of the frame's one-pixel border."""
    f = frame.astype(np.float32)
    ring = np.concatenate([f[0], f[-1], f[1:-1, 0], f[1:-1, -1]])
    return np.median(ring, axis=0)


def contrast(frame: np.ndarray) -> np.ndarray:
    """(H, W) float: each pixel's largest channel distance from the background colour."""
    return np.abs(frame.astype(np.float32) - background(frame)).max(-1)


def object_mask(frame: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest connected blob that stands out from the background."""
    import cv2

    m = (contrast(frame) > THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros(m.shape, bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def centroid(frame: np.ndarray) -> tuple[float, float] | None:
    m = object_mask(frame)
    if not m.any():
        return None
    w = contrast(frame).astype(np.float64) * m
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


def _core(frame: np.ndarray) -> np.ndarray | None:
    """(H, W) bool: the object's pixels whose colour is read, its antialiased rim skipped (all of it where nothing
    else is left); None without an object."""
    m = object_mask(frame)
    core = m & (contrast(frame) > 160)  # skip antialiased rim pixels
    if not core.any():
        core = m
    return core if core.any() else None


def _colour_of_core(frame: np.ndarray, core: np.ndarray) -> str:
    c = frame[core].astype(np.float32).mean(0) / 255.0
    c = c / max(float(c.max()), 1e-6)
    return min(_VOCAB, key=lambda k: float(np.linalg.norm(_VOCAB[k] - c)))


def colour_of(frame: np.ndarray) -> str | None:
    core = _core(frame)
    return None if core is None else _colour_of_core(frame, core)


def fill_ratio(frame: np.ndarray) -> float | None:
    m = object_mask(frame)
    if not m.any():
        return None
    k = contrast(frame).astype(np.float64)
    cover = np.clip(k / max(float(k[m].max()), 1.0), 0, 1) * m
    # sub-pixel bounding box: a column's extent is its largest coverage (edges count fractionally)
    width, height = cover.max(0).sum(), cover.max(1).sum()
    return float(cover.sum() / max(width * height, 1e-6))


def shape_of(frame: np.ndarray) -> str | None:
    r = fill_ratio(frame)
    return None if r is None else min(FILL, key=lambda k: abs(FILL[k] - r))


def solid_share(frame: np.ndarray) -> float | None:
    """The share of the object's core pixels (as :func:`colour_of` reads them) whose own colour, normalized by its
    brightest channel, is nearest the object's colour; None without an object."""
    core = _core(frame)
    if core is None:
        return None
    px = frame[core].astype(np.float32) / 255.0
    px = px / np.maximum(px.max(1, keepdims=True), 1e-6)
    nearest = np.argmin(((px[:, None, :] - _VOCAB_RGB[None]) ** 2).sum(-1), 1)
    return float(np.mean(_VOCAB_NAMES[nearest] == _colour_of_core(frame, core)))


def solid(frame: np.ndarray) -> bool:
    """The object is one colour enough (``SOLID``) for its outline, hence its shape, to be read."""
    s = solid_share(frame)
    return s is not None and s >= SOLID


def video_summary(video: np.ndarray) -> dict:
    """Per-frame colours, shapes, solidity, centroids of a (F, H, W, 3) uint8 clip."""
    return {
        "colours": [colour_of(f) for f in video],
        "shapes": [shape_of(f) for f in video],
        "solid": [solid(f) for f in video],
        "centroids": [centroid(f) for f in video],
    }


def centroid_drift(source: np.ndarray, edit: np.ndarray) -> float:
    """Mean distance (px) between the object's centroids in source and edit; inf if it vanished."""
    d = []
    for a, b in zip(source, edit):
        ca, cb = centroid(a), centroid(b)
        if ca is None or cb is None:
            return float("inf")
        d.append(math.dist(ca, cb))
    return float(np.mean(d))
