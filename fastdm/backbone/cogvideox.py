"""Backbone for CogVideoX text-to-video (1.0: 2B, 5B; 1.5-5B): diffusers ``CogVideoXTransformer3DModel`` (joint
text+video attention), ``AutoencoderKLCogVideoX`` (8x in space, 4x in time, 16 channels), a T5 text encoder and a
``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` with v-prediction. This is the only module touching these
classes.

* **Noise and prediction.** A DDPM schedule (scaled linear betas, rescaled to zero terminal SNR, SNR shifted by
  ``snr_shift_scale``): ``x_t = a x + b e`` with ``a = sqrt(alpha_bar_t)``, ``b = sqrt(1 - alpha_bar_t)`` from the
  scheduler's own ``alphas_cumprod``, and the transformer fed the integer t, as the pipeline feeds it. It
  predicts ``v = a e - b x``; :meth:`Backbone.to_noise_prediction` turns it into ``e = a v + b x_t`` *before*
  V-DDS subtracts the two branches (their x_t differ: the edited and the source video).
* **Layout.** The working tensor is the VAE latent times ``scaling_factor`` (as ``CogVideoXVideoToVideoPipeline``
  encodes), ``(1, 16, F', H/8, W/8)``; the transformer takes ``[B, F', C, h, w]`` (frames before channels) and
  the pipeline's 3D RoPE tables (5B, 1.5) computed here as ``_prepare_rotary_positional_embeddings`` does.
* **Joint attention.** ``attn1`` runs one set of projections over ``[text (226 tokens); video]``; its per-head
  ``norm_k`` output ``[B, heads, 226 + N, 64]`` is the capture point (the RoPE the processor applies next only
  touches the video part). The keys fastdm compares are that output's video slice, heads merged: ``[B, N, heads *
  64]``. The automatic mask reads the video-to-text block of the same attention (video queries after ``norm_q``,
  text keys after ``norm_k``).
* **Frames.** 8k+1 (9, 17, ..., 49, 81): the VAE packs 4 frames a latent frame after frame 0, and its decoder
  gives back 4j+1 frames only for an odd number j+1 of latent frames (an even one decodes to 4(j+1); checked on
  the class). CogVideoX 1.5 patches two latent frames together; for an odd latent count its pipeline puts a
  noise latent frame in front of the transformer's input and drops it afterwards. fastdm does the same per
  denoiser call with a copy of the first latent frame (noised with it), so the working tensor keeps the count
  the VAE decodes, and the keys of one call cover the padded frames of both branches alike.
* **Guidance.** The pipeline's default is 6 (``use_dynamic_cfg`` ramps it; fastdm uses one scale).
"""

from __future__ import annotations

import torch

from ..errors import Unsupported
from .base import Backbone, BackboneInfo
from .dit import ScaledLatent, TapSlice as _Slice, VideoTransformer
from .flow import (
    causal_mask_frames,
    causal_video_range,
    clean_prompt,
    latent_frames,
)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads * d]``; a ``[B, N, C]`` projection passes through."""
    return x.transpose(1, 2).flatten(2) if x.dim() == 4 else x


class CogVideoXBackbone(ScaledLatent, VideoTransformer, Backbone):
    denoiser_class = "CogVideoXTransformer3DModel"
    edit_defaults = {"guidance_scale": 6.0}  # CogVideoXPipeline's
    family = "CogVideoX 2B, 5B and 1.5-5B"
    denoiser_keyword = "transformer"

    def __init__(self, *, transformer, text_encoder, tokenizer, scheduler, vae, path: str, native_size, device, dtype):
        if vae is None:
            raise Unsupported("a CogVideoX folder needs its vae/ (AutoencoderKLCogVideoX): the transformer works on its latents")
        cfg = scheduler.config
        if cfg.get("prediction_type") != "v_prediction":
            raise Unsupported(f"CogVideoX predicts v (prediction_type v_prediction); this scheduler says {cfg.get('prediction_type')!r}; "
                              "fix scheduler/scheduler_config.json")
        if int(transformer.config.in_channels) != int(vae.config.latent_channels):
            raise Unsupported(f"the transformer takes {transformer.config.in_channels} input channels and the VAE gives "
                              f"{vae.config.latent_channels} (an image-to-video model carries the image in extra channels); "
                              "fastdm edits with text-to-video models")
        self._place(transformer, text_encoder, vae, device, dtype)
        self.tokenizer = tokenizer
        self._abar = scheduler.alphas_cumprod.detach().double().clone()
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        tc = transformer.config
        self.patch, self.patch_t = int(tc.patch_size), (int(tc.patch_size_t) if tc.patch_size_t else None)
        self.text_len = int(tc.max_text_seq_length)
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.temporal_factor = int(vae.config.temporal_compression_ratio)
        self._scale = float(vae.config.scaling_factor)
        if native_size is None:  # 1.0: 720x480, 49 frames; 1.5: 1360x768, 81 frames
            native_size = (1360, 768) if self.patch_t else (720, 480)
        self.info = BackboneInfo(
            name=type(transformer).__name__,
            space="latent",
            path=path,
            native_size=tuple(native_size),
            size_multiple=self.spatial_factor * self.patch,
            spatial_factor=self.spatial_factor,
            num_train_timesteps=self.num_train_timesteps,
            prediction_type="v_prediction",
        )

    @staticmethod
    def accepts(denoiser) -> bool:
        from diffusers import CogVideoXTransformer3DModel

        return isinstance(denoiser, CogVideoXTransformer3DModel)

    # -- noising (DDPM, v-prediction) -------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._abar

    def noise_coefficients(self, t: int) -> tuple[float, float]:
        abar = float(self._abar[int(t)])
        return abar**0.5, (1.0 - abar) ** 0.5

    # -- text -------------------------------------------------------------------------------
    def text_length(self) -> int:
        return self.text_len

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """T5 embeddings of each prompt padded to the transformer's ``max_text_seq_length`` (226) and run
        unmasked, as CogVideoXPipeline's ``_get_t5_prompt_embeds`` (the transformer sees every position)."""
        if self.text_encoder is None:
            raise Unsupported("the text encoder was released; encode prompts before releasing it")
        enc = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        te_device = next(self.text_encoder.parameters()).device
        return self.text_encoder(enc.input_ids.to(te_device))[0].to(self.device, self.dtype)

    def text_embedding_shape(self) -> tuple[int, int]:
        return self.text_len, int(self.transformer.config.text_embed_dim)

    # -- frames and working space -----------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_factor)

    def frame_count_problem(self, num_frames: int) -> str | None:
        k = self.temporal_factor
        if (num_frames - 1) % (2 * k):
            fit = max(1, (num_frames - 1) // (2 * k) * 2 * k + 1)
            return (f"this CogVideoX model's VAE decodes an odd number of latent frames, so it takes {2 * k}k+1 frames "
                    f"(9, 17, ..., 49, 81) and the video has {num_frames}; pass `frames={fit}`")
        return None

    def working_to_video_range(self, start: int, stop: int) -> tuple[int, int]:
        return causal_video_range(start, stop, self.temporal_factor)

    def native_frames(self) -> int:
        frames = getattr(self, "_native_frames", None)
        return self.latent_frames(int(frames) if frames else (81 if self.patch_t else 49))

    def mask_frames_to_working(self, mask: torch.Tensor) -> torch.Tensor:
        return causal_mask_frames(mask, self.temporal_factor)

    # -- denoiser ---------------------------------------------------------------------------
    def rotary_embedding(self, latent_frames: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D RoPE tables of CogVideoXPipeline's ``_prepare_rotary_positional_embeddings`` (None for 2B)."""
        tc = self.transformer.config
        if not tc.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        gh, gw = h // self.patch, w // self.patch
        base_w, base_h = tc.sample_width // self.patch, tc.sample_height // self.patch
        if self.patch_t is None:
            crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=tc.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                           temporal_size=latent_frames, device=device)
        return get_3d_rotary_pos_embed(embed_dim=tc.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
                                       temporal_size=(latent_frames + self.patch_t - 1) // self.patch_t, grid_type="slice",
                                       max_size=(base_h, base_w), device=device)

    def denoiser_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The transformer's v for ``sample`` ``[B, C, F', h, w]`` at integer timesteps (fed as they are)."""
        pad = self._pad(sample.shape[2])
        if pad:  # (CogVideoX 1.5: a whole number of temporal patches, the first latent frame repeated in front)
            sample = torch.cat([sample[:, :, :1].expand(-1, -1, pad, -1, -1), sample], 2)
        _, _, f, h, w = sample.shape
        rope = self.rotary_embedding(f, h, w, sample.device)
        if rope is not None and sample.device.type != "meta":
            rope = tuple(r.to(sample.device) for r in rope)
        out = self.transformer(sample.permute(0, 2, 1, 3, 4), text, timestep, image_rotary_emb=rope, return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)[:, :, pad:]

    def _pad(self, latent_frames: int) -> int:
        """Latent frames CogVideoX 1.5's pipeline puts in front to fill its temporal patches (0 for 1.0)."""
        return (-latent_frames) % self.patch_t if self.patch_t else 0

    # -- taps -------------------------------------------------------------------------------
    def _norm_or_proj(self, attn, which: str):
        """``norm_k`` / ``norm_q`` (per-head LayerNorm, ``[B, heads, T + N, d]``), or the projection when the
        model has no q/k norm (``[B, T + N, C]``)."""
        norm = getattr(attn, f"norm_{which}", None)
        return norm if norm is not None else getattr(attn, f"to_{which}")

    def _video_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """The video part of a joint-attention tensor (``[B, heads, T + N, d]`` or ``[B, T + N, C]``), heads merged."""
        return _merge_heads(o[:, :, self.text_len:] if o.dim() == 4 else o[:, self.text_len:])

    def _text_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """The text part (the first ``max_text_seq_length`` tokens), heads merged."""
        return _merge_heads(o[:, :, :self.text_len] if o.dim() == 4 else o[:, :self.text_len])

    def key_module(self, layer: str):
        """The keys of the video tokens: ``attn1.norm_k``'s output past the text prefix, heads merged,
        before the rotary embedding."""
        attn = self.spatial_self_attention_layers()[layer]
        module = self._norm_or_proj(attn, "k")
        return _Slice(module, self._video_tokens)

    def keys_to_frames(self, keys: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B, F'' * N, C)`` -> ``(B, F'', N, C)``: F'' the temporal patches of one call (1.5: padded, halved)."""
        lat = self.latent_frames(num_frames)
        f = (lat + self._pad(lat)) // (self.patch_t or 1)
        return keys.reshape(keys.shape[0], f, keys.shape[1] // f, keys.shape[2])

    def cross_attention_layers(self) -> dict:
        """The video-to-text block of each joint attention: video queries, text keys (both before RoPE)."""
        from .base import CrossAttention

        out = {}
        for i, b in enumerate(self.transformer.transformer_blocks):
            a = b.attn1
            q = _Slice(self._norm_or_proj(a, "q"), self._video_tokens)
            k = _Slice(self._norm_or_proj(a, "k"), self._text_tokens)
            out[f"transformer_blocks.{i}.attn1"] = CrossAttention(q, k, int(a.heads), (a.to_q.out_features // a.heads) ** -0.5)
        return out

    def word_token_positions(self, prompt: str) -> list[list[int]]:
        from .base import word_token_positions

        return word_token_positions(self.tokenizer, clean_prompt(prompt), self.text_length())
