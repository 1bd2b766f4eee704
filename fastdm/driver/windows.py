"""Windows of a long clip: where the model looks in each step of a windowed edit.

A clip longer than the model's own length (``EditConfig.window``, default the backbone's native
frame count: ``Backbone.native_frames``) is edited window by window on one shared tensor: each step
places windows of ``n`` consecutive working frames at a stride of ``n (1 - window_overlap)`` (default
``n // 2``) from a random phase,
clamped to the clip (so the first starts at frame 0 and the last ends at the clip's end), runs the
step on each and gives every frame the mean of its windows' updates. Every frame is updated once per
step, whatever its place; the seams between windows move from step to step, so none stays.
"""

from __future__ import annotations

import torch


def window_stride(n: int, overlap: float) -> int:
    return max(1, round(n * (1 - overlap)))


def window_starts(frames: int, n: int, phase: int, stride: int | None = None) -> list[int]:
    """Start frames of the windows of one step: ``stride`` apart (default ``n // 2``) from ``phase``,
    clamped to ``[0, frames - n]``; consecutive windows overlap or touch, so every frame is covered."""
    if frames <= n:
        return [0]
    stride = stride or max(1, n // 2)
    out = {min(max(0, s), frames - n) for s in range(phase % stride - stride, frames, stride)}
    return sorted(out)


def coverage(frames: int, n: int, starts: list[int]) -> torch.Tensor:
    """How many of the windows hold each frame: ``(frames,)`` float."""
    c = torch.zeros(frames)
    for s in starts:
        c[s:s + n] += 1
    return c
