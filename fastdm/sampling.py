"""Sampling with any fastdm backbone: DDIM with classifier-free guidance, and the sampling editors
fastdm is measured against (``benchmarks/cost.py``): SDEdit (:func:`ddim_video_to_video`) and FlowEdit
(:func:`flowedit`, flow-matching backbones).

Not part of a DreamMotion edit; it checks what a backbone has learned (e.g. the trained shapes model).
"""

from __future__ import annotations

import numpy as np
import torch

from .backbone import Backbone
from .io.tensors import tensor_to_frames
from .errors import Unsupported
from .losses.vdds import guided_noise


def guided_prediction(backbone: Backbone, x_t: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor,
                      guidance_scale: float) -> torch.Tensor:
    """The guided noise prediction at ``x_t`` (batch 1): classifier-free guidance with ``cond``/``uncond`` text
    (two evaluations), or, for a guidance-distilled backbone, one evaluation with the scale as its input."""
    if getattr(backbone, "guidance_distilled", False):
        backbone.embedded_guidance = guidance_scale
        return backbone.predict_noise(x_t, t, cond)
    eps = backbone.predict_noise(torch.cat([x_t, x_t]), t, torch.cat([cond, uncond]))
    return guided_noise(eps[1:2], eps[0:1], guidance_scale)


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
    n_train = backbone.info.num_train_timesteps
    ts = [i * (n_train // steps) + 1 for i in reversed(range(steps))]  # DDIM "leading" spacing, offset 1
    x = ddim_loop(backbone, x, ts, text, guidance_scale=guidance_scale, gen=gen, eta=eta, clip_x0=clip_x0)
    return tensor_to_frames(backbone.from_working(x))


@torch.no_grad()
def ddim_loop(backbone: Backbone, x: torch.Tensor, ts: list[int], text: torch.Tensor, *, guidance_scale: float,
              gen: torch.Generator, eta: float = 0.0, clip_x0: bool = False) -> torch.Tensor:
    """DDIM from the working tensor ``x`` at timestep ``ts[0]`` (``x = a x0 + b e`` with the backbone's
    ``noise_coefficients``) down to a clean one; ``text`` is ``[prompt, negative]``. The loop of
    :func:`ddim_sample` and :func:`ddim_video_to_video`; for a flow-matching backbone it runs on the
    variance-preserving form of x (see ``scale``), DDIM's own parametrization."""
    alphas = backbone.alphas_cumprod
    lo_hi = backbone.valid_range

    def scale(t: int) -> float:
        """Model input = scale * the variance-preserving x: 1 for DDPM models; for flow matching
        (x_t = (1 - s) x + s e) the loop runs on the VP form with the same signal-to-noise ratio,
        x_vp = x_t / sqrt((1 - s)^2 + s^2), which is what ``alphas_cumprod`` describes."""
        a, b = backbone.noise_coefficients(t)
        c = (a * a + b * b) ** 0.5
        return 1.0 if abs(c - 1.0) < 1e-6 else c

    x = x / scale(ts[0])
    for i, t in enumerate(ts):
        c = scale(t)
        e = guided_prediction(backbone, x * c if c != 1.0 else x, t, text[0:1], text[1:2], guidance_scale)
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
    return x


@torch.no_grad()
def ddim_video_to_video(backbone: Backbone, frames: np.ndarray, prompt: str, *, strength: float = 0.8, steps: int = 50,
                        guidance_scale: float = 7.5, seed: int = 0, negative_prompt: str = "", eta: float = 0.0) -> np.ndarray:
    """Video-to-video (SDEdit, as diffusers' ``VideoToVideoSDPipeline``): the video ``(F, H, W, 3)`` uint8 is
    noised to ``strength`` of the schedule (the last ``round(steps * strength)`` of ``steps`` DDIM steps)
    and denoised with ``prompt``. Deterministic for a seed."""
    from .io.tensors import frames_to_tensor

    x0 = backbone.to_working(frames_to_tensor(frames))
    n_train = backbone.info.num_train_timesteps
    ts = [i * (n_train // steps) + 1 for i in reversed(range(steps))]
    ts = ts[steps - max(1, min(steps, round(steps * strength))):]
    gen = torch.Generator("cpu").manual_seed(seed)
    a, b = backbone.noise_coefficients(ts[0])
    x = a * x0 + b * torch.randn(x0.shape, generator=gen).to(x0.device)
    text = backbone.encode_prompts([prompt, negative_prompt])
    x = ddim_loop(backbone, x, ts, text, guidance_scale=guidance_scale, gen=gen, eta=eta)
    return tensor_to_frames(backbone.from_working(x))


@torch.no_grad()
def flowedit(backbone, clip: np.ndarray, source_prompt: str, target_prompt: str, *, steps: int = 50, n_max: int = 33,
             n_min: int = 0, n_avg: int = 1, src_guidance: float = 3.5, tar_guidance: float = 13.5, seed: int = 0) -> np.ndarray:
    """FlowEdit (Kulikov et al. 2024) on a flow-matching backbone: inversion-free ODE from the source to
    the target. Over ``steps`` timesteps (the backbone's shifted sigmas on a uniform grid) it skips the
    first ``steps - n_max``; then per step noises the source, moves the target point by the source's
    noise offset, and moves the edit by dt x (v(target, c_tar) - v(source, c_src)), each velocity with
    its own guidance, averaged over ``n_avg`` noises; the last ``n_min`` steps are plain sampling."""
    from .io.tensors import frames_to_tensor

    if backbone.info.prediction_type != "flow":
        raise Unsupported("FlowEdit needs a flow-matching backbone (a Wan transformer)", field="model")
    n_train = backbone.info.num_train_timesteps
    ts = [round(n_train - 1 - i * (n_train - 1) / steps) for i in range(steps)]  # descending, t = T-1 first
    sig = [backbone.noise_coefficients(t)[1] for t in ts] + [0.0]
    x_src = backbone.to_working(frames_to_tensor(clip))
    text = backbone.encode_prompts([source_prompt, "", target_prompt])
    gen = torch.Generator("cpu").manual_seed(seed)

    def velocity(x_t, t, cond, guidance):
        a = backbone.noise_coefficients(t)[0]
        e = guided_prediction(backbone, x_t, t, cond[None], text[1:2], guidance)
        return (e - x_t) / a  # v = e - x0 with x_t = (1 - s) x0 + s e

    z = x_src.clone()
    z_t = None
    for i in range(steps - n_max, steps):
        t, s, s_next = ts[i], sig[i], sig[i + 1]
        if i < steps - n_min:
            dv = torch.zeros_like(z)
            for _ in range(n_avg):
                e = torch.randn(x_src.shape, generator=gen).to(x_src.device)
                zs_t = (1 - s) * x_src + s * e
                zt_t = z + zs_t - x_src
                dv += (velocity(zt_t, t, text[2], tar_guidance) - velocity(zs_t, t, text[0], src_guidance)) / n_avg
            z = z + (s_next - s) * dv
        else:
            if z_t is None:
                e = torch.randn(x_src.shape, generator=gen).to(x_src.device)
                z_t = z + ((1 - s) * x_src + s * e) - x_src
            z_t = z_t + (s_next - s) * velocity(z_t, t, text[2], tar_guidance)
            z = z_t
    if backbone.valid_range is not None:
        z = z.clamp(*backbone.valid_range)
    return tensor_to_frames(backbone.from_working(z))
