"""The synthetic "shapes" world: one coloured object on black, moving in a straight line.

Vocabulary (fixed, so anyone can write prompts for it)::

    colours:    red green blue yellow magenta cyan white
    shapes:     circle square triangle
    directions: left right up down
    prompt:     "a {colour} {shape} moving {direction}"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInput

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def prompt(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # upward-pointing, centred on its bounding box
        top, bottom = -r, r * 0.8
        half = (dy - top) / (bottom - top) * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half)
    raise BadInput(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def render_clip(colour: str, shape: str, direction: str, *, size: int = 32, frames: int = 8, radius: float = 7.0,
                speed: float = 2.0, start: tuple[float, float] | None = None, supersample: int = 4) -> np.ndarray:
    """(frames, size, size, 3) uint8; the object starts at ``start`` (centre, pixels) and moves
    ``speed`` pixels per frame. By default it starts so that the path is centred in the frame."""
    vx, vy = DIRECTIONS[direction]
    if start is None:
        travel = speed * (frames - 1)
        start = (size / 2 - vx * travel / 2, size / 2 - vy * travel / 2)
    ss = supersample
    coords = (np.arange(size * ss) + 0.5) / ss
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    out = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        cx, cy = start[0] + vx * speed * f, start[1] + vy * speed * f
        cover = _inside(shape, xx - cx, yy - cy, radius).astype(np.float32)
        cover = cover.reshape(size, ss, size, ss).mean(axis=(1, 3))
        out[f] = np.round(cover[..., None] * rgb).astype(np.uint8)
    return out


def render_back_and_forth(colour: str, shape: str, frames: int, *, size: int = 32, leg: int = 11, speed: float = 1.5,
                          radius: float = 5.5) -> np.ndarray:
    """A clip of any length: the object goes right for ``leg`` frames, then left, and so on, centred in
    the frame (each frame moves ``speed`` px, as in the training clips), so it never leaves the frame."""
    travel = speed * leg
    out = np.zeros((frames, size, size, 3), np.uint8)
    for f in range(frames):
        k, r = divmod(f, leg)
        x = size / 2 - travel / 2 + (r * speed if k % 2 == 0 else travel - r * speed)
        out[f] = render_clip(colour, shape, "right", size=size, frames=1, radius=radius, speed=0.0, start=(x, size / 2))[0]
    return out


def sample_clip(rng: np.random.Generator, *, size: int = 32, frames: int = 8, supersample: int = 2):
    """A random training clip: (frames (F, S, S, 3) uint8, prompt, metadata).

    Radius 4..size/4 px, speed 1..2.5 px/frame, a start that keeps the whole path inside the frame.
    """
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    radius = float(rng.uniform(4.0, size / 4))
    speed = float(rng.uniform(1.0, 2.5))
    vx, vy = DIRECTIONS[direction]
    travel = speed * (frames - 1)
    lo, hi = radius + 1, size - radius - 1

    def axis(v):
        if v > 0:
            return float(rng.uniform(lo, max(lo, hi - travel)))
        if v < 0:
            return float(rng.uniform(min(hi, lo + travel), hi))
        return float(rng.uniform(lo, hi))

    start = (axis(vx), axis(vy))
    clip = render_clip(colour, shape, direction, size=size, frames=frames, radius=radius, speed=speed,
                       start=start, supersample=supersample)
    meta = {"colour": colour, "shape": shape, "direction": direction, "radius": radius, "speed": speed, "start": start}
    return clip, prompt(colour, shape, direction), meta


# The shapes model's architecture (tools/train_shapes.py trains it).
WORDS = ("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, prediction_type="epsilon")
MODEL = dict(
    sample_size=32, in_channels=3, out_channels=3,
    down_block_types=("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"),
    up_block_types=("CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=64, attention_head_dim=8,
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)


def build_model(tok_dir: str | Path):
    """(tokenizer, text encoder, UNet3D, scheduler) of the shapes model, random weights; the
    tokenizer files are written to ``tok_dir``."""
    from diffusers import DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..testing import write_clip_tokenizer

    write_clip_tokenizer(tok_dir, words=WORDS, max_length=TEXT["max_position_embeddings"])
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **TEXT))
    unet = UNet3DConditionModel(**MODEL)
    return tok, text, unet, DDIMScheduler(**SCHEDULER)
