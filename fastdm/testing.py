"""Tiny models built from configs and saved as real diffusers-format folders.

Tests and the benchmark presets use these so every code path goes through the same loader
as a downloaded ZeroScope folder. The tokenizer is a real ``CLIPTokenizer`` with a small
byte-pair vocabulary built here (character level plus whole words of a given word list).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backbone.components import DEFAULT_WORDS, write_clip_tokenizer  # noqa: F401  (re-exported)


def build_tiny_model(
    folder: str | Path,
    *,
    latent: bool = False,
    size: int = 32,
    channels: tuple[int, ...] = (32, 64),
    text_dim: int = 32,
    seed: int = 0,
    words=DEFAULT_WORDS,
    max_length: int = 16,
) -> Path:
    """Build a random-weight UNet3D text-to-video model and save it as a diffusers folder.

    ``latent=True`` adds a small AutoencoderKL (factor 2), otherwise the model works on pixels.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(folder / "tokenizer", words=words, max_length=max_length)
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=text_dim,
            intermediate_size=text_dim * 2,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    factor = 2 if latent else 1
    n = len(channels)
    unet = UNet3DConditionModel(
        sample_size=size // factor,
        in_channels=4 if latent else 3,
        out_channels=4 if latent else 3,
        down_block_types=("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
    )
    index = {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet3DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": [None, None],
    }
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    if latent:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8, sample_size=size,
        )
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
