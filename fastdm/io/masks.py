"""Edit masks: a mask video/image/frame folder (white = editable) or per-frame boxes.

Both come out as ``(F, H, W)`` float32 arrays of 0/1 aligned with the frames the edit uses
(same frame selection, same resize + centre crop).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FastDMError
from .video import Crop, read_frames, resize_crop


def load_mask(path: str, *, indices: list[int], src_size: tuple[int, int], total_frames: int | None, crop: Crop) -> np.ndarray:
    """Read a mask for the input frames ``indices`` (of an input of ``src_size`` = (W, H)).

    A single image applies to every frame; a video or folder must have the input's frame count
    (as far as it was read) and size.
    """
    arr, _, _ = read_frames(path, what="mask")
    w, h = src_size
    if arr.shape[1:3] != (h, w):
        raise FastDMError(f"mask '{path}' is {arr.shape[2]}x{arr.shape[1]} but the video is {w}x{h}; give a mask of the video's size")
    if arr.shape[0] == 1:
        arr = np.repeat(arr, len(indices), 0)
    else:
        if total_frames is not None and arr.shape[0] != total_frames or arr.shape[0] <= max(indices):
            raise FastDMError(
                f"mask '{path}' has {arr.shape[0]} frames but the video has {total_frames}; give one mask frame per video frame (or a single image)"
            )
        arr = arr[indices]
    gray = arr.astype(np.float32).mean(-1)
    m = (gray > 127.5).astype(np.uint8) * 255
    m = resize_crop(m, crop, nearest=True)
    return (m > 127).astype(np.float32)


def _parse_boxes(data, path: str) -> dict[int, list[float]]:
    """Accept ``[[x0,y0,x1,y1], ...]`` (frame i = item i) or ``{"frame": box}`` (keyframes),
    optionally wrapped as ``{"boxes": ...}``."""
    if isinstance(data, dict) and "boxes" in data:
        data = data["boxes"]
    if isinstance(data, list):
        items = dict(enumerate(data))
    elif isinstance(data, dict):
        try:
            items = {int(k): v for k, v in data.items()}
        except ValueError:
            raise FastDMError(f"boxes file '{path}': keys must be frame numbers") from None
    else:
        raise FastDMError(f"boxes file '{path}' must hold a list of [x0, y0, x1, y1] or {{frame: box}}")
    if not items:
        raise FastDMError(f"boxes file '{path}' holds no boxes")
    out = {}
    for k, b in items.items():
        if k < 0:
            raise FastDMError(f"boxes file '{path}': negative frame number {k}")
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise FastDMError(f"boxes file '{path}': frame {k} box must be [x0, y0, x1, y1] numbers, got {b!r}")
        out[k] = [float(v) for v in b]
    return out


def boxes_to_mask(path: str, *, indices: list[int], src_size: tuple[int, int], crop: Crop) -> np.ndarray:
    """Per-frame box masks; keyframes are linearly interpolated, held constant outside them."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FastDMError(f"boxes file '{path}' does not exist; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastDMError(f"boxes file '{path}' is not valid JSON ({e}); expected [[x0, y0, x1, y1], ...]") from None
    boxes = _parse_boxes(data, path)
    w, h = src_size
    for k, (x0, y0, x1, y1) in boxes.items():
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise FastDMError(
                f"boxes file '{path}': frame {k} box {[x0, y0, x1, y1]} is outside the {w}x{h} frame or empty; "
                f"use input pixels with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}"
            )
    keys = sorted(boxes)
    tw, th = crop.size
    yy, xx = np.mgrid[0:th, 0:tw] + 0.5  # pixel centres
    masks = []
    for i in indices:
        b = np.array(boxes[keys[0]] if i <= keys[0] else boxes[keys[-1]] if i >= keys[-1] else _interp(boxes, keys, i))
        x0, y0, x1, y1 = crop.map_box(b)
        masks.append(((xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)).astype(np.float32))
    return np.stack(masks)


def _interp(boxes: dict[int, list[float]], keys: list[int], i: int) -> list[float]:
    lo = max(k for k in keys if k <= i)
    hi = min(k for k in keys if k >= i)
    if lo == hi:
        return boxes[lo]
    a = (i - lo) / (hi - lo)
    return [(1 - a) * p + a * q for p, q in zip(boxes[lo], boxes[hi])]
