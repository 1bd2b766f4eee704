"""The small interface every backbone implements.

The optimizer driver only talks to this interface; diffusers/transformers classes stay inside
the concrete backbone files (``unet3d.py`` for ``UNet3DConditionModel``).

Working space: the tensor the edit optimizes, shaped ``(B, C, F, h, w)`` in fp32 — VAE latents
(times the VAE scaling factor) for latent models, pixels in [-1, 1] for pixel-space models.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..errors import FastDMError


def stop_recording(*_) -> None:
    """Forward hook for truncated backprop: autograd stops recording once the hooked module has
    run (returns None, so the module's output is left as it is). The caller re-enables grad."""
    torch.set_grad_enabled(False)


@dataclass(frozen=True)
class BackboneInfo:
    name: str  # class name of the denoiser
    space: str  # "latent" or "pixel"
    path: str  # folder it was loaded from
    native_size: tuple[int, int]  # (width, height) in pixels
    size_multiple: int  # input width/height must be multiples of this
    spatial_factor: int  # pixels per working-space cell (VAE factor; 1 in pixel space)
    num_train_timesteps: int


class Backbone(abc.ABC):
    info: BackboneInfo
    device: torch.device
    dtype: torch.dtype  # weights' dtype; the edited tensor stays fp32

    @property
    @abc.abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar(t) for t = 0..T-1 as a float64 CPU tensor."""

    @property
    def valid_range(self) -> tuple[float, float] | None:
        """Range the edited working tensor is kept in (pixels: [-1, 1]); None when unbounded."""
        return (-1.0, 1.0) if self.info.space == "pixel" else None

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``(len(prompts), L, D)`` on the backbone's device and dtype."""

    @abc.abstractmethod
    def release_text_encoder(self) -> None:
        """Free the text encoder (prompts are encoded once per edit)."""

    @abc.abstractmethod
    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(F, 3, H, W)`` in [-1, 1] -> working tensor ``(1, C, F, h, w)`` fp32."""

    @abc.abstractmethod
    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        """Working tensor ``(1, C, F, h, w)`` -> frames ``(F, 3, H, W)`` in [-1, 1], fp32 on CPU."""

    @abc.abstractmethod
    def working_shape(self, num_frames: int, size: tuple[int, int]) -> tuple[int, ...]:
        """Shape ``(1, C, F, h, w)`` of the working tensor for ``num_frames`` frames of ``size`` = (W, H)."""

    @abc.abstractmethod
    def predict_noise(self, x_t: torch.Tensor, t: int, text: torch.Tensor, grad_until: str | None = None) -> torch.Tensor:
        """Noise prediction for a batch ``x_t (B, C, F, h, w)`` with text embeddings ``(B, L, D)``.

        ``grad_until``: name of a module after which autograd stops recording (truncated backprop).
        """

    def set_block_checkpointing(self, enabled: bool) -> None:  # noqa: B027 - optional
        """Recompute block activations in the backward (optional; default: not supported, no-op)."""

    def set_vae_tiling(self, enabled: bool) -> None:  # noqa: B027 - optional
        """Encode/decode latents tile by tile (latent models; no-op in pixel space)."""

    def set_attention(self, kind: str) -> None:
        """Attention implementation: ``"sdpa"`` (PyTorch scaled-dot-product attention, the default)
        or ``"xformers"``; refuses with the reason when one is unavailable."""
        if kind != "sdpa":
            raise FastDMError(f"--attention {kind}: {type(self).__name__} supports only sdpa")

    @abc.abstractmethod
    def spatial_self_attention_layers(self) -> dict[str, torch.nn.Module]:
        """Spatial (per-frame) self-attention modules by qualified name, in forward order."""

    @abc.abstractmethod
    def default_tap_layers(self) -> list[str]:
        """Names of the layers whose keys S-SSM/T-SSM use by default."""
