"""Weight-free video metrics: motion fidelity from dense optical flow, frame consistency.

Optical flow is OpenCV's Farneback dense flow (``cv2.calcOpticalFlowFarneback``), computed on
the per-pixel maximum over RGB (the HSV "value"), so that an object keeps its contrast against
the background when only its colour is edited (a blue object is dark in luminance, not in value).

All functions take ``(F, H, W, 3)`` uint8 videos.
"""

from __future__ import annotations

import numpy as np

from .errors import BadInput

_FARNEBACK = dict(pyr_scale=0.5, levels=2, winsize=7, iterations=5, poly_n=5, poly_sigma=1.1, flags=0)


def _value(frame: np.ndarray) -> np.ndarray:
    return frame.max(axis=-1).astype(np.uint8)


def optical_flow(video: np.ndarray) -> np.ndarray:
    """Dense flow between consecutive frames: ``(F-1, H, W, 2)`` float32 (dx, dy) in pixels."""
    import cv2

    if video.shape[0] < 2:
        return np.zeros((0, *video.shape[1:3], 2), np.float32)
    v = [_value(f) for f in video]
    return np.stack([cv2.calcOpticalFlowFarneback(a, b, None, **_FARNEBACK) for a, b in zip(v[:-1], v[1:])])


def motion_fidelity(source: np.ndarray, edit: np.ndarray, min_motion: float = 0.5) -> dict[str, float]:
    """How well the edit keeps the source's motion.

    ``fidelity``: mean over pixels moving in either video (|flow| > ``min_motion`` px) of
    ``f_s . f_e / max(|f_s|, |f_e|)^2`` — 1 for identical flow, lower for a different direction
    or speed, negative for opposite motion. ``epe``: mean endpoint error |f_e - f_s| (px) over
    the same pixels. A video without motion in either input scores 1 / 0.
    """
    if source.shape != edit.shape:
        raise BadInput(f"videos differ in shape: {source.shape} vs {edit.shape}; compare an edit with its own source")
    fs, fe = optical_flow(source), optical_flow(edit)
    ms, me = np.linalg.norm(fs, axis=-1), np.linalg.norm(fe, axis=-1)
    moving = (ms > min_motion) | (me > min_motion)
    if not moving.any():
        return {"fidelity": 1.0, "epe": 0.0}
    dot = (fs * fe).sum(-1)
    denom = np.maximum(ms, me) ** 2
    fid = float((dot[moving] / denom[moving]).mean())
    epe = float(np.linalg.norm(fe - fs, axis=-1)[moving].mean())
    return {"fidelity": fid, "epe": epe}


def warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp ``frame`` with ``flow`` (flow maps frame t -> t+1; result approximates t+1)."""
    import cv2

    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    # t+1 at p came from t at p - flow(p) (first-order; flow is smooth for rigid motion)
    return cv2.remap(frame, gx - flow[..., 0], gy - flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def frame_consistency(video: np.ndarray) -> float:
    """1 - mean flow-warping error between consecutive frames (in [0, 1]; 1 = perfectly consistent).

    Each frame is predicted from the previous one by warping it along the video's own optical flow;
    flicker and content that appears or changes from frame to frame raise the error.
    """
    if video.shape[0] < 2:
        return 1.0
    flows = optical_flow(video)
    errs = [np.abs(warp(a, f).astype(np.float32) - b.astype(np.float32)).mean() / 255.0
            for a, b, f in zip(video[:-1], video[1:], flows)]
    return float(1.0 - np.mean(errs))
