"""Text-to-video sampling with any fastdm backbone: DDIM (eta = 0) with classifier-free guidance.

Not part of an edit; it checks what a backbone has learned (e.g. the trained shapes model).
"""

from __future__ import annotations

import numpy as np
import torch

from .backbone import Backbone
from .driver.pipeline import tensor_to_frames
from .losses.vdds import guided_noise


@torch.no_grad()
def ddim_sample(backbone: Backbone, prompt: str, *, frames: int = 8, size: tuple[int, int] | None = None,
                steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, negative_prompt: str = "",
                eta: float = 0.0, clip_x0: bool = False) -> np.ndarray:
    """Sample a video for ``prompt``: ``(frames, H, W, 3)`` uint8. Deterministic for a seed.

    ``eta`` is DDIM's stochasticity (0: deterministic DDIM, 1: DDPM-like ancestral steps).
    ``clip_x0`` clamps each predicted clean video to the backbone's valid range. Off by default:
    for data that sits on the range's edge (the shapes world's black background is exactly -1)
    the clamp cuts only one side of the prediction error, so every step biases the background
    upwards and samples end grey and noisy.
    """
    w, h = size or backbone.info.native_size
    shape = backbone.to_working(torch.zeros(frames, 3, h, w)).shape  # (1, C, F, h', w')
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(backbone.device)
    text = backbone.encode_prompts([prompt, negative_prompt])
    alphas = backbone.alphas_cumprod
    n_train = backbone.info.num_train_timesteps
    ts = [i * (n_train // steps) + 1 for i in reversed(range(steps))]  # DDIM "leading" spacing, offset 1
    lo_hi = backbone.valid_range
    for i, t in enumerate(ts):
        eps = backbone.predict_noise(torch.cat([x, x]), t, text)
        e = guided_noise(eps[1:2], eps[0:1], guidance_scale)
        a = float(alphas[t])
        a_prev = float(alphas[ts[i + 1]]) if i + 1 < len(ts) else float(alphas[0])
        x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
        if clip_x0 and lo_hi is not None:
            x0 = x0.clamp(*lo_hi)
            e = (x - a**0.5 * x0) / (1 - a) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * e
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
    return tensor_to_frames(backbone.from_working(x))
