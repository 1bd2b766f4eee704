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
    """A local T5 tokenizer and a 2-layer ``UMT5EncoderModel`` (seeded): Wan's text side, tiny."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _tiny_text(tok_dir, words, max_length, seed, lambda tok: UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=text_dim, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu")))


def _tiny_t5(tok_dir: Path, words, max_length: int, text_dim: int, seed: int):
    """A local T5 tokenizer and a 2-layer ``T5EncoderModel`` (seeded): LTX's and CogVideoX's text side, tiny."""
    from transformers import T5Config, T5EncoderModel

    return _tiny_text(tok_dir, words, max_length, seed, lambda tok: T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=text_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu")))


def _tiny_text(tok_dir: Path, words, max_length: int, seed: int, make):
    """A local T5 tokenizer written to ``tok_dir``, then ``make(tokenizer)`` seeded: ``(tokenizer, encoder)``."""
    from transformers import T5TokenizerFast

    from .backbone.flow import write_t5_tokenizer

    write_t5_tokenizer(tok_dir, words, max_length=max_length)
    tok = T5TokenizerFast.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    return tok, make(tok)


def _save_pipeline(pipe, folder: Path, native_size=None, frames=None) -> Path:
    """``pipe.save_pretrained(folder)`` (diffusers' own layout), the scratch tokenizer folder removed, and the
    optional ``fastdm.json`` (native size, frames)."""
    import shutil

    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(folder / "tok", ignore_errors=True)
    meta = {k: v for k, v in (("native_size", list(native_size) if native_size else None), ("frames", frames)) if v}
    if meta:
        (folder / "fastdm.json").write_text(json.dumps(meta))
    return folder


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
    return _save_pipeline(pipe, folder, native_size)


def build_tiny_ltx_model(folder: str | Path, *, text_dim: int = 32, seed: int = 0, words=DEFAULT_WORDS, max_length: int = 16,
                         num_layers: int = 2, native_size: tuple[int, int] | None = None, frames: int | None = None) -> Path:
    """A random-weight LTX-Video pipeline of the real classes saved by diffusers' own ``LTXPipeline.save_pretrained``:
    ``LTXVideoTransformer3DModel`` (2 layers, 4 heads of 8 channels) on an ``AutoencoderKLLTXVideo`` of 8 latent
    channels that compresses 4x in space and time (two scaling stages; the real one 32x / 8x), a 2-layer
    ``T5EncoderModel``, a local T5 tokenizer and a fixed-shift ``FlowMatchEulerDiscreteScheduler``. Sizes as
    diffusers' own LTX tests."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, text_encoder = _tiny_t5(folder / "tok", words, max_length, text_dim, seed)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
                                upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                                             attention_head_dim=8, cross_attention_dim=32, num_layers=num_layers,
                                             caption_channels=text_dim)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tok,
                       transformer=transformer)
    return _save_pipeline(pipe, folder, native_size, frames)


def build_tiny_cogvideox_model(folder: str | Path, *, version: str = "1.0", text_dim: int = 32, seed: int = 0, words=DEFAULT_WORDS,
                               max_length: int = 16, native_size: tuple[int, int] | None = None, frames: int | None = None) -> Path:
    """A random-weight CogVideoX pipeline of the real classes saved by diffusers' own ``CogVideoXPipeline.save_pretrained``:
    ``version="1.0"``: the 5B's kind (3D RoPE, per-head q/k LayerNorm); ``"1.5"``: two latent frames patched
    together; ``"2b"``: sin-cos positions, no RoPE. A 2-block transformer (2 heads of 16: the RoPE splits a head in 4 + 6 + 6), an ``AutoencoderKLCogVideoX``
    of 4 latent channels (8x in space, 4x in time), a 2-layer ``T5EncoderModel``, a local T5 tokenizer and the
    v-prediction ``CogVideoXDDIMScheduler`` of the released configs. Sizes as diffusers' own CogVideoX tests."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, text_encoder = _tiny_t5(folder / "tok", words, max_length, text_dim, seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=text_dim,
        num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=max_length, use_rotary_positional_embeddings=version != "2b",
        use_learned_positional_embeddings=False, patch_size_t=2 if version == "1.5" else None, patch_bias=version != "1.5")
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                 layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                       snr_shift_scale=3.0 if version == "2b" else 1.0, clip_sample=False, set_alpha_to_one=True)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    return _save_pipeline(pipe, folder, native_size, frames)


def build_tiny_hunyuan_model(folder: str | Path, *, text_dim: int = 16, seed: int = 0, words=DEFAULT_WORDS, max_length: int = 16,
                             guidance_embeds: bool = True, native_size: tuple[int, int] | None = None,
                             frames: int | None = None) -> Path:
    """A random-weight HunyuanVideo pipeline of the real classes saved by diffusers' own
    ``HunyuanVideoPipeline.save_pretrained``: a ``HunyuanVideoTransformer3DModel`` of one dual-stream and one
    single-stream block (2 heads of 10, patch 2, guidance embedding unless ``guidance_embeds=False``), an
    ``AutoencoderKLHunyuanVideo`` of 4 latent channels (8x in space, 4x in time), a 3-layer ``LlamaModel`` with a
    local tokenizer carrying Llama 3's special tokens, a 2-layer ``CLIPTextModel`` (pooled 8) and the shift-7
    ``FlowMatchEulerDiscreteScheduler``. ``fastdm.json`` holds the template's ``crop_start`` for this tokenizer
    (the released one's is the pipeline's 95) and ``max_sequence_length=max_length``."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from .backbone.hunyuan import write_llama_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    crop = write_llama_tokenizer(folder / "tok", words)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder / "tok"))
    write_clip_tokenizer(folder / "tok2", words=words, max_length=77)  # (the pipeline's CLIP reads 77 tokens)
    tok2 = CLIPTokenizer.from_pretrained(str(folder / "tok2"))
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=text_dim, intermediate_size=37, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok2), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok2.bos_token_id,
                                        eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id))
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                                 num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                                 patch_size_t=1, guidance_embeds=guidance_embeds, text_embed_dim=text_dim,
                                                 pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=tok2)
    _save_pipeline(pipe, folder, native_size, frames)
    import shutil

    shutil.rmtree(folder / "tok2", ignore_errors=True)
    meta_path = folder / "fastdm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(crop_start=crop, max_sequence_length=max_length)
    meta_path.write_text(json.dumps(meta))
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
