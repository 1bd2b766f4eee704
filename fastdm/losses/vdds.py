"""V-DDS: video Delta Denoising Score, the appearance term of DreamMotion.

Each step draws one timestep ``t`` and one noise ``e`` shared by both branches, noises the edited
video ``x`` and the source video ``x^`` with them, and uses

    g = s * w(t) * mask * ( e_cfg(x_t, target) - e_cfg(x^_t, source) )

as the gradient on ``x`` (no backprop through the UNet).

Gradient scale convention (``s``): as in the DDS reference code, the per-element gradient is
``2000 / (H * W)`` times the guided noise difference, where H x W is the spatial size of the
*working* tensor (latent for latent models, pixels for pixel-space models). With it the paper's
SGD learning rate 0.4 means the same thing it means in the DDS/DreamMotion code. The scale does
not depend on the number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FastDMError

WEIGHTINGS = ("constant", "sds")


@dataclass(frozen=True)
class VDDSConfig:
    guidance_scale: float = 7.5
    t_min: int = 50
    t_max: int = 950
    # "constant": w(t) = 1 (DDS reference); "sds": w(t) = 1 - alpha_bar(t) (DreamFusion).
    weighting: str = "constant"
    # Multiplier on top of the 2000/(H*W) convention (1.0 = the reference scale).
    grad_scale: float = 1.0

    def validate(self, num_train_timesteps: int) -> None:
        if not 0 <= self.t_min <= self.t_max < num_train_timesteps:
            raise FastDMError(
                f"timestep range [{self.t_min}, {self.t_max}] must lie inside [0, {num_train_timesteps - 1}] "
                "with t_min <= t_max"
            )
        if self.weighting not in WEIGHTINGS:
            raise FastDMError(f"unknown V-DDS weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def sample_timestep(cfg: VDDSConfig, generator: torch.Generator) -> int:
    """t ~ U{t_min, ..., t_max} (inclusive), drawn from ``generator`` (a CPU generator)."""
    return int(torch.randint(cfg.t_min, cfg.t_max + 1, (1,), generator=generator).item())


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: e_u + s (e_c - e_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def weight(cfg: VDDSConfig, alpha_bar_t: float) -> float:
    return 1.0 if cfg.weighting == "constant" else 1.0 - float(alpha_bar_t)


def vdds_gradient(
    eps_target: torch.Tensor,
    eps_source: torch.Tensor,
    alpha_bar_t: float,
    cfg: VDDSConfig,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The V-DDS gradient on the edited tensor ``(B, C, F, H, W)`` in fp32.

    ``mask`` (broadcastable to the tensor, 1 = editable) limits the edit to the object.
    """
    h, w = eps_target.shape[-2:]
    scale = cfg.grad_scale * 2000.0 / (h * w) * weight(cfg, alpha_bar_t)
    g = (eps_target.float() - eps_source.float()) * scale
    if mask is not None:
        g = g * mask
    return g
