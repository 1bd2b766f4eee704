"""Backbone for LTX-Video 0.9.x text-to-video: diffusers ``LTXVideoTransformer3DModel`` (a flow-matching video
transformer on *packed* tokens), ``AutoencoderKLLTXVideo`` (a causal video VAE: 32x in space, 8x in time, 128
latent channels), a T5 text encoder and ``FlowMatchEulerDiscreteScheduler``. This is the only module touching
these classes.

* **Noise and prediction** as every flow-matching family here (:mod:`fastdm.backbone.flow`): integer t ->
  ``s(t)`` on the scheduler's shifted schedule, ``x_t = (1 - s) x + s e``, the transformer fed ``s * T`` and
  predicting the velocity ``e - x``. LTXPipeline passes a resolution-dependent ``mu``, which only a scheduler
  with ``use_dynamic_shifting`` uses: those (0.9.0 and 0.9.1, which also stretch to ``shift_terminal``) are
  refused with the reason; 0.9.5 and later have a fixed schedule.
* **Layout**: the working tensor is the VAE's normalized latent ``(1, 128, F', H/32, W/32)`` (``(z - mean) *
  scaling_factor / std``, as the pipeline's ``_normalize_latents``); the transformer takes it packed as the
  pipeline's ``_pack_latents`` does, ``[B, F' h w, C]`` frame-major, with the latent grid size and the RoPE
  interpolation scale ``(temporal ratio / frame rate, spatial ratio, spatial ratio)`` at 25 fps, and returns it
  packed.
* **Text**: T5 embeddings of the prompt padded to 128 tokens (run unmasked, as the pipeline runs them); the
  transformer masks the padding with the attention mask. fastdm passes embeddings alone, so the padded rows
  are zeroed and the mask is read back from the rows that are not zero (a real token's T5 output is never
  all zero; the masked rows' values change nothing).
* **Keys**: ``transformer_blocks.N.attn1`` is self-attention over video tokens only; the capture point is the
  output of ``attn1.norm_k`` (the RMS norm across heads after ``to_k``), before the rotary embedding the
  processor applies next. The automatic mask reads ``attn2`` (queries after ``norm_q``, T5 keys after
  ``norm_k``, no rotary embedding).
* **Frames**: 8k+1 (the VAE keeps frame 0 alone); decoding of a timestep-conditioned decoder (0.9.1 and later)
  at the pipeline's default ``decode_timestep`` 0 with no added noise.
* **Guidance**: LTXPipeline's default is 3 (distilled checkpoints: 1); pass ``guidance_scale``.
"""

from __future__ import annotations

import torch

from ..errors import Unsupported
from .base import Backbone, BackboneInfo
from .dit import VideoTransformer
from .flow import (
    FlowNoise,
    causal_frame_problem,
    causal_mask_frames,
    causal_video_range,
    clean_prompt,
    flow_shift,
    latent_frames,
    shifted_sigma,
)

MAX_TEXT_TOKENS = 128  # LTXPipeline's max_sequence_length
FRAME_RATE = 25  # LTXPipeline's default frame_rate (the RoPE's temporal interpolation scale divides by it)


class LTXBackbone(VideoTransformer, FlowNoise, Backbone):
    denoiser_class = "LTXVideoTransformer3DModel"
    edit_defaults = {"guidance_scale": 3.0}  # LTXPipeline's
    family = "LTX-Video 0.9.5 and later, 2B and 13B"
    denoiser_keyword = "transformer"

    def __init__(self, *, transformer, text_encoder, tokenizer, scheduler, vae, path: str, native_size, device, dtype):
        if vae is None:
            raise Unsupported("an LTX-Video folder needs its vae/ (AutoencoderKLLTXVideo): the transformer works on its latents")
        z = int(vae.config.latent_channels)
        if int(transformer.config.in_channels) != z * int(transformer.config.patch_size) ** 2 * int(transformer.config.patch_size_t):
            raise Unsupported(f"the transformer takes {transformer.config.in_channels} input channels and the VAE gives {z} "
                              "latent channels; fastdm edits with text-to-video models whose transformer reads the VAE's latents")
        self._place(transformer, text_encoder, vae, device, dtype)
        self.tokenizer = tokenizer
        self.shift = flow_shift(scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.spatial_ratio = int(vae.spatial_compression_ratio)
        self.temporal_ratio = int(vae.temporal_compression_ratio)
        self.patch, self.patch_t = int(transformer.config.patch_size), int(transformer.config.patch_size_t)
        self._mean = vae.latents_mean.detach().float().view(1, -1, 1, 1, 1)
        self._std = vae.latents_std.detach().float().view(1, -1, 1, 1, 1)
        self._scale = float(vae.config.scaling_factor)
        self.info = BackboneInfo(
            name=type(transformer).__name__,
            space="latent",
            path=path,
            native_size=tuple(native_size or (704, 512)),  # LTXPipeline's default 512 x 704 (height x width)
            size_multiple=self.spatial_ratio * self.patch,
            spatial_factor=self.spatial_ratio,
            num_train_timesteps=self.num_train_timesteps,
            prediction_type="flow",
        )

    @staticmethod
    def accepts(denoiser) -> bool:
        from diffusers import LTXVideoTransformer3DModel

        return isinstance(denoiser, LTXVideoTransformer3DModel)

    # -- text -------------------------------------------------------------------------------
    def text_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, MAX_TEXT_TOKENS))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """T5 embeddings of each prompt padded to :meth:`text_length` and run unmasked (LTXPipeline's
        ``_get_t5_prompt_embeds``), the padded rows then zeroed (they carry the attention mask)."""
        if self.text_encoder is None:
            raise Unsupported("the text encoder was released; encode prompts before releasing it")
        length = self.text_length()
        enc = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        te_device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(enc.input_ids.to(te_device))[0]
        keep = enc.attention_mask.to(te_device, hidden.dtype)[..., None]
        return (hidden * keep).to(self.device, self.dtype)

    def text_embedding_shape(self) -> tuple[int, int]:
        return self.text_length(), int(self.transformer.config.caption_channels)

    # -- frames and working space -----------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_ratio)

    def frame_count_problem(self, num_frames: int) -> str | None:
        problem = causal_frame_problem(num_frames, self.temporal_ratio, "this LTX-Video model")
        if problem is None and self.patch_t > 1 and self.latent_frames(num_frames) % self.patch_t:
            problem = f"the transformer patches {self.patch_t} latent frames together; {num_frames} frames do not divide"
        return problem

    def working_to_video_range(self, start: int, stop: int) -> tuple[int, int]:
        return causal_video_range(start, stop, self.temporal_ratio)

    def native_frames(self) -> int:
        frames = getattr(self, "_native_frames", None)
        return self.latent_frames(int(frames) if frames else 161)  # LTXPipeline's default 161 frames

    def mask_frames_to_working(self, mask: torch.Tensor) -> torch.Tensor:
        return causal_mask_frames(mask, self.temporal_ratio)

    @torch.no_grad()
    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(self._video(frames)).latent_dist.mode().float()
        return ((z - self._mean.to(z.device)) * self._scale / self._std.to(z.device)).contiguous()

    @torch.no_grad()
    def decode_working(self, x: torch.Tensor) -> torch.Tensor:
        z = x.float() * self._std.to(x.device) / self._scale + self._mean.to(x.device)
        temb = torch.zeros(z.shape[0], device=z.device, dtype=self.dtype) if self.vae.config.timestep_conditioning else None
        video = self.vae.decode(z.to(self.dtype), temb).sample
        return video[0].permute(1, 0, 2, 3).float().clamp(-1, 1)

    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_working(x).cpu()

    def working_shape(self, num_frames: int, size: tuple[int, int]) -> tuple[int, ...]:
        w, h = size
        r = self.spatial_ratio
        return (1, int(self.vae.config.latent_channels), self.latent_frames(num_frames), h // r, w // r)

    # -- denoiser ---------------------------------------------------------------------------
    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, F/pt * H/p * W/p, C pt p p]`` (LTXPipeline's ``_pack_latents``)."""
        b, c, f, h, w = x.shape
        p, pt = self.patch, self.patch_t
        x = x.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)

    def _unpack(self, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """The inverse of :meth:`_pack` (LTXPipeline's ``_unpack_latents``) for a grid of ``f x h x w`` tokens."""
        p, pt = self.patch, self.patch_t
        x = x.reshape(x.shape[0], f, h, w, -1, pt, p, p)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def denoiser_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for ``sample`` ``[B, C, F', h, w]`` at integer timesteps ``timestep``
        (fed as ``s(t) * T``), packed in and unpacked out; the text mask read from the non-zero rows."""
        T = self.num_train_timesteps
        model_t = shifted_sigma(timestep.to(torch.float32) / T, self.shift) * T
        _, _, f, h, w = sample.shape
        gf, gh, gw = f // self.patch_t, h // self.patch, w // self.patch
        mask = (text.abs().amax(-1) > 0).to(sample.dtype)
        mask[:, 0] = 1  # (a prompt has at least its end token; keeps an all-zero row from masking every key)
        scale = (self.temporal_ratio / FRAME_RATE, self.spatial_ratio, self.spatial_ratio)
        out = self.transformer(self._pack(sample), text, model_t, mask, num_frames=gf, height=gh, width=gw,
                               rope_interpolation_scale=scale, return_dict=False)[0]
        return self._unpack(out, gf, gh, gw)

    # -- taps -------------------------------------------------------------------------------
    def key_module(self, layer: str) -> torch.nn.Module:
        """``attn1.norm_k``: keys after their RMS norm, before the rotary embedding."""
        return self.spatial_self_attention_layers()[layer].norm_k

    def keys_to_frames(self, keys: torch.Tensor, num_frames: int) -> torch.Tensor:
        f = self.latent_frames(num_frames) // self.patch_t
        return keys.reshape(keys.shape[0], f, keys.shape[1] // f, keys.shape[2])

    def cross_attention_layers(self) -> dict:
        from .base import CrossAttention

        return {f"transformer_blocks.{i}.attn2": CrossAttention(b.attn2.norm_q, b.attn2.norm_k, int(b.attn2.heads),
                                                                 (b.attn2.to_q.out_features // b.attn2.heads) ** -0.5)
                for i, b in enumerate(self.transformer.transformer_blocks)}

    def text_key_mask(self, text: torch.Tensor) -> torch.Tensor:
        """The mask :meth:`denoiser_forward` gives the transformer: the non-zero rows (and the first)."""
        mask = text.abs().amax(-1) > 0
        mask[:, 0] = True
        return mask

    def word_token_positions(self, prompt: str) -> list[list[int]]:
        from .base import word_token_positions

        return word_token_positions(self.tokenizer, clean_prompt(prompt), self.text_length())
