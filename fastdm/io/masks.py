"""Edit masks: a mask video/image/frame folder (white = editable) or per-frame boxes.

Both come out as ``(F, H, W)`` float32 arrays of 0/1 aligned with the frames the edit uses
(same frame selection, same resize + centre crop).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FastDMError
from .video import IMAGE_EXTS, Crop, read_frames, resize_crop


def is_still_image(path: str | os.PathLike) -> bool:
    """A single png/jpg file: as a mask it applies to every frame."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def read_mask(path: str | os.PathLike, *, indices: list[int], src_size: tuple[int, int], total_frames: int | None) -> np.ndarray:
    """Read and check a mask for the input frames ``indices`` of an input of ``src_size`` = (W, H)
    that has ``total_frames`` frames in all (None: not known). Returns ``(len(indices), H, W)``
    uint8, 255 = editable, at the input's resolution.

    The mask must have the input's size. A single still image (a one-frame png/jpg file) applies
    to every frame; anything else (a video, a GIF, a frame folder) must have exactly the input's
    frame count, even with --frames/--stride (the mask follows the same frame selection), so a
    one-frame GIF or folder is not taken as a still. Note that GIF writers keep identical
    consecutive frames as one frame, so a GIF of a static mask looks shorter than it is.
    """
    still = is_still_image(path)
    arr, _, _ = read_frames(path, what="mask")
    w, h = src_size
    if arr.shape[1:3] != (h, w):
        raise FastDMError(f"mask '{path}' is {arr.shape[2]}x{arr.shape[1]} but the video is {w}x{h}; give a mask of the video's size")
    n = arr.shape[0]
    if still and n == 1:
        arr = np.repeat(arr, len(indices), 0)
    else:
        if (total_frames is not None and n != total_frames) or n <= max(indices):
            have = total_frames if total_frames is not None else f"at least {max(indices) + 1}"
            gif = (" (a GIF keeps identical consecutive frames as one: write the mask as mp4 or a folder of png frames)"
                   if Path(path).suffix.lower() == ".gif" and total_frames is not None and n < total_frames else "")
            raise FastDMError(
                f"mask '{path}' has {n} frame{'s' if n != 1 else ''} but the video has {have}{gif}; "
                "give one mask frame per video frame, or a single png/jpg image for every frame"
            )
        arr = arr[indices]
    gray = arr.astype(np.float32).mean(-1)
    return (gray > 127.5).astype(np.uint8) * 255


def crop_mask(mask: np.ndarray, crop: Crop) -> np.ndarray:
    """A :func:`read_mask` result resized + centre-cropped like the frames: ``(F, h, w)`` float32 0/1."""
    return (resize_crop(mask, crop, nearest=True) > 127).astype(np.float32)


def uncrop_mask(mask: np.ndarray, crop: Crop) -> np.ndarray:
    """A working-size ``(F, h, w)`` mask back at the input's size (the inverse of :func:`crop_mask`; what the
    crop cut off is 0): ``(F, H, W)`` float32 0/1."""
    from PIL import Image

    w, h = crop.src_size
    tw, th = crop.size
    rw, rh = max(tw, round(w * crop.scale)), max(th, round(h * crop.scale))
    out = []
    for m in np.asarray(mask):
        canvas = np.zeros((rh, rw), np.uint8)
        canvas[crop.y:crop.y + th, crop.x:crop.x + tw] = (m > 0.5) * 255
        out.append(np.asarray(Image.fromarray(canvas).resize((w, h), Image.NEAREST)) > 127)
    return np.stack(out).astype(np.float32)


def load_mask(path: str | os.PathLike, *, indices: list[int], src_size: tuple[int, int], total_frames: int | None,
              crop: Crop) -> np.ndarray:
    """:func:`read_mask` (see it for the rules) then :func:`crop_mask`: ``(F, h, w)`` float32 0/1."""
    return crop_mask(read_mask(path, indices=indices, src_size=src_size, total_frames=total_frames), crop)


def _parse_boxes(data, what: str, total_frames: int | None) -> dict[int, list[float]]:
    """Accept ``[[x0,y0,x1,y1], ...]`` (frame i = item i) or ``{"frame": box}`` (keyframes),
    optionally wrapped as ``{"boxes": ...}``."""
    if isinstance(data, dict) and "boxes" in data:
        data = data["boxes"]
    if isinstance(data, list):
        if data and not isinstance(data[0], list):
            raise FastDMError(f"{what} must hold a list of boxes [[x0, y0, x1, y1], ...], got a list of {type(data[0]).__name__}")
        if total_frames is not None and len(data) not in (1, total_frames):
            raise FastDMError(
                f"{what} has {len(data)} boxes but the video has {total_frames} frames; give one box per frame, "
                'a single box for every frame, or keyframes {"0": [x0, y0, x1, y1], "12": [...]}'
            )
        items = dict(enumerate(data))
    elif isinstance(data, dict):
        try:
            items = {int(k): v for k, v in data.items()}
        except ValueError:
            raise FastDMError(f"{what}: keys must be frame numbers, e.g. {{\"0\": [x0, y0, x1, y1]}}") from None
    else:
        raise FastDMError(f"{what} must hold a list of [x0, y0, x1, y1] or {{frame: box}}")
    if not items:
        raise FastDMError(f"{what} holds no boxes; give at least one [x0, y0, x1, y1]")
    out = {}
    for k, b in items.items():
        if k < 0:
            raise FastDMError(f"{what}: negative frame number {k}; frames count from 0")
        if total_frames is not None and k >= total_frames:
            raise FastDMError(f"{what}: keyframe {k} is past the video's last frame ({total_frames - 1}); "
                              "number frames from 0 in the whole input")
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise FastDMError(f"{what}: frame {k} box must be [x0, y0, x1, y1] numbers, got {b!r}")
        out[k] = [float(v) for v in b]
    return out


def read_boxes(path: str | os.PathLike, *, src_size: tuple[int, int], total_frames: int | None = None) -> dict[int, list[float]]:
    """Read and check a boxes file: ``{frame: [x0, y0, x1, y1]}`` in input pixels.

    A list gives one box per frame of the whole input (``total_frames`` of them, when known) or
    a single box for every frame; a ``{"frame": box}`` object gives keyframes, which must be
    frames of the input. Every box must lie inside the ``src_size`` = (W, H) frame and not be empty.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FastDMError(f"boxes file '{path}' does not exist; check the path") from None
    except IsADirectoryError:
        raise FastDMError(f"boxes file '{path}' is a folder; give a .json file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastDMError(f"boxes file '{path}' is not valid JSON ({e}); expected [[x0, y0, x1, y1], ...]") from None
    except RecursionError:
        raise FastDMError(f"boxes file '{path}' is nested too deeply; expected [[x0, y0, x1, y1], ...]") from None
    what = f"boxes file '{path}'"
    return _check_inside(_parse_boxes(data, what, total_frames), what, src_size)


def _check_inside(boxes: dict[int, list[float]], what: str, src_size: tuple[int, int]) -> dict[int, list[float]]:
    w, h = src_size
    for k, (x0, y0, x1, y1) in boxes.items():
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise FastDMError(
                f"{what}: frame {k} box {[x0, y0, x1, y1]} is outside the {w}x{h} frame or empty; "
                f"use input pixels with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}"
            )
    return boxes


def check_boxes(text: str, *, name: str, src_size: tuple[int, int], total_frames: int | None = None) -> dict[int, list[float]]:
    """:func:`read_boxes` of boxes given as JSON text (a form field, a node input), called ``name`` in messages."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FastDMError(f"{name} is not valid JSON ({e}); expected [[x0, y0, x1, y1], ...] or {{\"0\": [x0, y0, x1, y1]}}") from None
    except RecursionError:
        raise FastDMError(f"{name} is nested too deeply; expected [[x0, y0, x1, y1], ...]") from None
    return _check_inside(_parse_boxes(data, name, total_frames), name, src_size)


def boxes_to_mask(path: str | os.PathLike | dict, *, indices: list[int], src_size: tuple[int, int], crop: Crop,
                  total_frames: int | None = None) -> np.ndarray:
    """Per-frame box masks ``(F, h, w)`` float32 0/1 from a boxes file (see :func:`read_boxes`) or its
    result; keyframes are linearly interpolated, held constant outside them."""
    boxes = path if isinstance(path, dict) else read_boxes(path, src_size=src_size, total_frames=total_frames)
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
