"""What the video-transformer backbones share (LTX-Video, CogVideoX; Wan has two experts and keeps its own):
one ``transformer`` with a ``vae`` beside it, a text encoder kept on the CPU, blocks to checkpoint, the default
tap rule, and ``to``."""

from __future__ import annotations

import contextlib

import torch

from ..errors import FastDMError
from .base import checkpoint_forwards, tiled_vae
from .flow import cast_module


class TapSlice:
    """A tap on a module whose output holds more than what is tapped (joint attention: text and video tokens in
    one tensor): hooks see ``transform(output)``, e.g. the video part with heads merged."""

    def __init__(self, module: torch.nn.Module, transform):
        self.module, self.transform = module, transform

    def register_forward_hook(self, hook):
        return self.module.register_forward_hook(lambda m, i, o: hook(m, i, self.transform(o)))


class VideoTransformer:
    """Mixin for a :class:`~fastdm.backbone.base.Backbone` holding ``transformer``, ``vae`` and ``text_encoder``;
    ``blocks`` names the transformer's list of blocks."""

    blocks = "transformer_blocks"
    text_encoder_on_cpu = True  # (T5-XXL: 4.8 B parameters) never on the accelerator

    def _place(self, transformer, text_encoder, vae, device, dtype) -> None:
        """The modules where they run: transformer and VAE on ``device`` in ``dtype`` (fp32 modules kept), the text
        encoder on the CPU (meta for FLOP counting) in bf16 unless fp32 was asked for (T5 overflows in fp16)."""
        self.device, self.dtype = torch.device(device), dtype
        self.transformer = cast_module(transformer, device, dtype).eval().requires_grad_(False)
        te_device = "meta" if self.device.type == "meta" else "cpu"
        self.text_encoder = cast_module(text_encoder, te_device, torch.float32 if dtype == torch.float32 else torch.bfloat16)
        self.text_encoder.eval().requires_grad_(False)
        self.vae = cast_module(vae, device, dtype).eval().requires_grad_(False)

    def _video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(F, 3, H, W)`` -> ``(1, 3, F, H, W)`` on the device in the model's dtype, the frame count checked."""
        problem = self.frame_count_problem(frames.shape[0])
        if problem:
            raise FastDMError(problem)
        return frames.to(self.device).permute(1, 0, 2, 3).unsqueeze(0).to(self.dtype)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def release_text_encoder(self) -> None:
        self.text_encoder = None

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "vae": self.vae}

    def to(self, device=None, dtype: torch.dtype | None = None):
        device = self.device if device is None else torch.device(device)
        dtype = dtype or self.dtype
        for m in self.modules().values():
            cast_module(m, device, dtype)
        self.device, self.dtype = device, dtype
        return self

    @contextlib.contextmanager
    def block_checkpointing(self, enabled: bool):
        """Gradient checkpointing of every transformer block while inside (forwards swapped, then restored)."""
        if not enabled:
            yield
            return
        with checkpoint_forwards(getattr(self.transformer, self.blocks)):
            yield

    def vae_tiling(self, enabled: bool):
        return tiled_vae(self.vae, enabled)

    def spatial_self_attention_layers(self) -> dict[str, torch.nn.Module]:
        """``<blocks>.<i>.attn1``: each block's attention over the video tokens (space and time)."""
        return {f"{self.blocks}.{i}.attn1": b.attn1 for i, b in enumerate(getattr(self.transformer, self.blocks))}

    def default_tap_layers(self) -> list[str]:
        """The attention at 1/6 of the depth, never block 0: the rule measured on shapes-dit (ARCHITECTURE.md,
        "Wan 2.1"), kept for transformers of the same kind until a measurement on the family says otherwise."""
        n = len(getattr(self.transformer, self.blocks))
        return [f"{self.blocks}.{min(n - 1, max(1, round(n / 6)))}.attn1"]


class ScaledLatent:
    """Mixin: the working tensor is the VAE latent's mode times ``scaling_factor`` (``self._scale``), as the
    pipelines encode it (CogVideoX, HunyuanVideo); decoded by dividing it out. Needs ``vae``, ``_video`` and
    ``latent_frames``."""

    @torch.no_grad()
    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(self._video(frames)).latent_dist.mode().float() * self._scale).contiguous()

    @torch.no_grad()
    def decode_working(self, x: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode((x.float() / self._scale).to(self.dtype)).sample
        return video[0].permute(1, 0, 2, 3).float().clamp(-1, 1)

    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_working(x).cpu()

    def working_shape(self, num_frames: int, size: tuple[int, int]) -> tuple[int, ...]:
        w, h = size
        f = self.info.spatial_factor
        return (1, int(self.vae.config.latent_channels), self.latent_frames(num_frames), h // f, w // f)
