"""Backbone for diffusers' ``UNet3DConditionModel`` (ModelScope / ZeroScope, and pixel-space
models of the same class such as our shapes model or Show-1's keyframe stage).

This is the only module that touches the (deprecated) UNet3D class directly.
"""

from __future__ import annotations

import contextlib
import re

import torch

from ..errors import FastDMError, Unsupported
from .base import Backbone, BackboneInfo, CrossAttention, checkpoint_forwards, tiled_vae, word_token_positions


def xformers_unavailable_reason(device: torch.device) -> str | None:
    """Why xformers' memory-efficient attention cannot run here, or None."""
    if device.type != "cuda":
        return f"xformers runs on CUDA GPUs and the model is on {device.type}"
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "xformers is not installed (pip install 'fastdm[xformers]')"
    return None

# Spatial self-attention in UNet3D: Transformer2DModel blocks under `attentions`
# (temporal attention lives under `temp_attentions` and `transformer_in`).
_SPATIAL_SELF_ATTN = re.compile(r"^(down_blocks|up_blocks)\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn1$|^mid_block\.attentions\.\d+\.transformer_blocks\.\d+\.attn1$")


_SPATIAL_CROSS_ATTN = re.compile(_SPATIAL_SELF_ATTN.pattern.replace("attn1", "attn2"))


_STAGE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _forward_order(name: str):
    """Sort key putting module names in the order UNet3D runs them (down, mid, up)."""
    parts = name.split(".")
    return (_STAGE.get(parts[0], 3), [int(p) if p.isdigit() else 0 for p in parts[1:]])


class UNet3DBackbone(Backbone):
    denoiser_class = "UNet3DConditionModel"
    family = "ZeroScope, ModelScope and pixel-space models of that class"
    def __init__(self, *, unet, text_encoder, tokenizer, scheduler, vae, path: str, native_size, device, dtype):
        self.unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae = None if vae is None else vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self._alphas = scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone()
        factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        levels = len(unet.config.block_out_channels)
        if native_size is None:
            side = int(unet.config.sample_size or 32) * factor
            native_size = (side, side)
        self.info = BackboneInfo(
            name=type(unet).__name__,
            space="pixel" if vae is None else "latent",
            path=path,
            native_size=tuple(native_size),
            size_multiple=factor * 2 ** (levels - 1),
            spatial_factor=factor,
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
            prediction_type=str(getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon"),
        )
        if vae is None and unet.config.in_channels != 3:
            raise Unsupported(f"a pixel-space UNet needs 3 input channels, this one has {unet.config.in_channels}")

    @staticmethod
    def accepts(unet) -> bool:
        from diffusers import UNet3DConditionModel

        return isinstance(unet, UNet3DConditionModel)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas

    # -- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise Unsupported("the text encoder was released; encode prompts before releasing it")
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def text_embedding_shape(self) -> tuple[int, int]:
        return int(self.tokenizer.model_max_length), int(self.unet.config.cross_attention_dim)

    def release_text_encoder(self) -> None:
        self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- working space ----------------------------------------------------------------------
    @torch.no_grad()
    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        frames = frames.to(self.device)
        if self.vae is None:
            x = frames.float()
        else:  # one frame at a time: VAE activations dominate memory at full size
            sf = self.vae.config.scaling_factor
            x = torch.cat(
                [self.vae.encode(f[None].to(self.dtype)).latent_dist.mean.float() * sf for f in frames]
            )
        return x.permute(1, 0, 2, 3).unsqueeze(0).contiguous()  # (1, C, F, h, w)

    @torch.no_grad()
    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        frames = x[0].permute(1, 0, 2, 3)  # (F, C, h, w)
        if self.vae is not None:
            sf = self.vae.config.scaling_factor
            frames = torch.cat([self.vae.decode((f[None] / sf).to(self.dtype)).sample.float() for f in frames])
        return frames.float().clamp(-1, 1).cpu()

    def working_shape(self, num_frames: int, size: tuple[int, int]) -> tuple[int, ...]:
        w, h = size
        f = self.info.spatial_factor
        return (1, int(self.unet.config.in_channels), num_frames, h // f, w // f)

    # -- denoiser ---------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def denoiser_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}
        return {k: m for k, m in mods.items() if m is not None}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "UNet3DBackbone":
        device = self.device if device is None else torch.device(device)
        dtype = dtype or self.dtype
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        return self

    def _checkpoint_units(self) -> list[torch.nn.Module]:
        """What lean recomputes: every layer of every down, mid and up block (each resnet, temporal
        convolution, spatial and temporal transformer, down/upsampler). Per layer rather than per
        block: a whole block recomputed at full resolution holds all of its activations at once,
        a layer only its own (measured with benchmarks/project_memory.py on ZeroScope 576w)."""
        units = []
        for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
            for child in block.children():
                units.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
        return units

    @contextlib.contextmanager
    def block_checkpointing(self, enabled: bool):
        """Gradient checkpointing inside the UNet blocks (diffusers has none for UNet3D) for the
        duration of the block: each layer of each block recomputes its activations in the backward
        instead of keeping them. The layers' ``forward`` is swapped on entry and restored on exit, so
        nothing outlives the call (the pipeline holds its lock around it)."""
        if not enabled:
            yield
            return
        with checkpoint_forwards(self._checkpoint_units()):
            yield

    def vae_tiling(self, enabled: bool):
        return tiled_vae(self.vae, enabled)

    def set_attention(self, kind: str) -> None:
        if kind == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
        elif kind == "xformers":
            reason = xformers_unavailable_reason(self.device)
            if reason:
                raise FastDMError(f"`attention=xformers`: {reason}; use `attention=sdpa`")
            self.unet.enable_xformers_memory_efficient_attention()
        else:
            raise FastDMError(f"unknown attention {kind!r}; choose sdpa or xformers")

    def spatial_self_attention_layers(self) -> dict[str, torch.nn.Module]:
        found = {n: m for n, m in self.unet.named_modules() if _SPATIAL_SELF_ATTN.match(n)}
        return {n: found[n] for n in sorted(found, key=_forward_order)}

    def cross_attention_layers(self) -> dict[str, CrossAttention]:
        found = {n: m for n, m in self.unet.named_modules() if _SPATIAL_CROSS_ATTN.match(n)}
        return {n: CrossAttention(found[n].to_q, found[n].to_k, int(found[n].heads), float(found[n].scale))
                for n in sorted(found, key=_forward_order)}

    def word_token_positions(self, prompt: str) -> list[list[int]]:
        return word_token_positions(self.tokenizer, prompt, int(self.tokenizer.model_max_length))

    def default_tap_layers(self) -> list[str]:
        """Spatial self-attention of the decoder's coarsest attention level.

        DreamMotion matches self-similarities of attention keys; decoder self-attention at the
        coarsest level carries layout and object structure (as in the PnP/DIFT/DMT analyses),
        keeps N small (180 tokens for ZeroScope at 576x320) and lets backprop stop right after
        the first decoder attention block.
        """
        layers = self.spatial_self_attention_layers()
        for i in range(len(self.unet.up_blocks)):
            chosen = [n for n in layers if n.startswith(f"up_blocks.{i}.")]
            if chosen:
                return chosen
        return list(layers)
