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


def _tiny_umt5(tok_dir: Path, words, max_length: int, text_dim: int, seed: int):
    """A local T5 tokenizer written to ``tok_dir`` and a 2-layer ``UMT5EncoderModel`` (seeded): Wan's text side, tiny."""
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    from .backbone.wan import write_t5_tokenizer

    write_t5_tokenizer(tok_dir, words, max_length=max_length)
    tok = T5TokenizerFast.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    return tok, UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=text_dim, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                            relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                            decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu"))


def build_tiny_wan_model(
    folder: str | Path,
    *,
    latent: bool = True,
    text_dim: int = 16,
    seed: int = 0,
    words=DEFAULT_WORDS,
    max_length: int = 16,
    num_layers: int = 2,
    shift: float = 3.0,
    native_size: tuple[int, int] | None = None,
) -> Path:
    """A random-weight Wan 2.1 text-to-video model of the real classes, saved as a diffusers folder:
    ``WanTransformer3DModel`` (2 layers, 2 heads of 12 channels, patch (1, 2, 2), as diffusers' own
    Wan tests), a tiny ``AutoencoderKLWan`` (``latent=True``; else the transformer works on pixels),
    a 2-layer ``UMT5EncoderModel``, a local ``T5TokenizerFast`` and a flow ``UniPCMultistepScheduler``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, text_encoder = _tiny_umt5(folder / "tokenizer", words, max_length, text_dim, seed)
    channels = 16 if latent else 3
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=channels, out_channels=channels, text_dim=text_dim, freq_dim=256,
                                        ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000)
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "vae": [None, None],
    }
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    if latent:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKLWan"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if native_size is not None:
        (folder / "fastdm.json").write_text(json.dumps({"native_size": list(native_size)}))
    return folder


def build_tiny_wan22_model(folder: str | Path, variant: str = "a14b", *, text_dim: int = 16, seed: int = 0, words=DEFAULT_WORDS,
                           max_length: int = 16, num_layers: int = 2, boundary_ratio: float | None = 0.875,
                           native_size: tuple[int, int] | None = None) -> Path:
    """A random-weight Wan 2.2 pipeline of the real classes, saved by diffusers' own ``WanPipeline.save_pretrained``:
    ``variant="a14b"``: two experts (``transformer``, ``transformer_2``) and ``boundary_ratio`` (None leaves it out)
    on a 16-channel VAE, flow shift 3; ``"ti2v"``: one transformer of 48 channels on a 48-channel
    ``AutoencoderKLWan`` with the 2x2 patchify and residual blocks of Wan 2.2's (16x in space), flow shift 5,
    ``expand_timesteps``. Sizes as diffusers' own Wan tests."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    if variant not in ("a14b", "ti2v"):
        raise ValueError(f"variant {variant!r}: a14b or ti2v")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, text_encoder = _tiny_umt5(folder / "tok", words, max_length, text_dim, seed)
    z = 48 if variant == "ti2v" else 16

    def expert():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z,
                                     out_channels=z, text_dim=text_dim, freq_dim=256, ffn_dim=32, num_layers=num_layers,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    if variant == "ti2v":
        vae = AutoencoderKLWan(base_dim=12, decoder_base_dim=12, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                               patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=expert(), expand_timesteps=True,
                           scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                             flow_shift=5.0, num_train_timesteps=1000))
    else:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
        pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=expert(), transformer_2=expert(),
                           boundary_ratio=boundary_ratio,
                           scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                             flow_shift=3.0, num_train_timesteps=1000))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "tok")
    if native_size is not None:
        (folder / "fastdm.json").write_text(json.dumps({"native_size": list(native_size)}))
    return folder


def build_tiny_stage_model(folder: str | Path, kind: str, *, size: int = 16, channels: tuple[int, ...] = (16, 32),
                           seed: int = 0, words=DEFAULT_WORDS) -> Path:
    """A random-weight cascade stage model (see ``fastdm.cascade``) saved as a diffusers folder: the
    :func:`build_tiny_model` folder with the UNet rebuilt for the stage's conditioning channels:
    ``upscale`` 6 inputs ([noisy, upsampled low-res]), ``interpolate`` 7 ([noisy, interpolated
    keyframes, keyframe mask]), ``refine`` a latent model (VAE latents in and out), ``edit`` the plain
    pixel model."""
    from diffusers import UNet3DConditionModel

    folder = build_tiny_model(folder, latent=kind == "refine", size=size, channels=channels, seed=seed, words=words)
    if kind in ("upscale", "interpolate"):
        cfg = dict(UNet3DConditionModel.load_config(str(Path(folder) / "unet")))
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg["in_channels"] = 6 if kind == "upscale" else 7
        torch.manual_seed(seed + 1)
        UNet3DConditionModel(**cfg).save_pretrained(Path(folder) / "unet", safe_serialization=True)
    return Path(folder)


class PointMassBackbone:
    """A backbone whose data, for each prompt, is one known video: its noise prediction is exact.

    ``data`` maps a prompt to its working tensor ``(1, C, F, h, w)`` (``""`` is the unconditional
    branch); the text embedding of a prompt is its index in ``data``. With ``flow=True`` it noises as
    flow matching (``x_t = (1 - s) c + s e``, ``s = (t + 1) / T``), as fastdm's Wan backbone does;
    else as DDPM with Stable Diffusion's scaled-linear schedule. For the editors that sample
    (SDEdit, FlowEdit) the exact answer is known in closed form, so their code can be checked."""

    def __init__(self, data: dict[str, torch.Tensor], *, flow: bool = False, num_train_timesteps: int = 1000):
        from .backbone.base import BackboneInfo

        self.prompts = list(data)
        self.data = torch.cat([data[p] for p in self.prompts]).double()
        self.flow, self.n = flow, num_train_timesteps
        self.device = torch.device("cpu")
        c, f, h, w = self.data.shape[1:]
        self.info = BackboneInfo("point-mass", "pixel", "-", (w, h), 1, 1, num_train_timesteps,
                                 prediction_type="flow" if flow else "epsilon")
        self.valid_range = (-1.0, 1.0)
        if flow:
            s = (torch.arange(num_train_timesteps, dtype=torch.float64) + 1) / num_train_timesteps
            self.alphas_cumprod = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
        else:
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
            self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.permute(1, 0, 2, 3).unsqueeze(0).double()

    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        return x[0].permute(1, 0, 2, 3).clamp(-1, 1).float()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([float(self.prompts.index(p)) for p in prompts], dtype=torch.float64).reshape(-1, 1, 1)

    def noise_coefficients(self, t: int) -> tuple[float, float]:
        if self.flow:
            s = (t + 1) / self.n
            return 1 - s, s
        a = float(self.alphas_cumprod[t])
        return a**0.5, (1 - a) ** 0.5

    def predict_noise(self, x_t: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        a, b = self.noise_coefficients(t)
        c = self.data[text.reshape(-1).long()]
        return (x_t.double() - a * c) / b
