"""Benchmark presets: exact architectures with random weights (nothing is downloaded).

* ``zeroscope-576w``  ZeroScope v2 576w: its UNet3D (1.41 B parameters), its OpenCLIP-H text tower
                      and the SD VAE, from the configs in ``configs/zeroscope-576w``; 576x320.
* ``modelscope-256``  the same architecture (ModelScope text-to-video 1.7B) at 256x256.
* ``shapes``          the bundled shapes model when it is there, else its architecture with random
                      weights (``tools/train_shapes.py``); 32x32.
* ``tiny``            a 2-level UNet3D of a few hundred thousand parameters; 16x16.
* ``wan2.1-t2v-1.3b`` Wan 2.1 T2V 1.3B: its ``WanTransformer3DModel`` (1.42 B parameters), UMT5-XXL
                      text encoder (5.68 B; kept on the CPU, released after the prompts) and
                      ``AutoencoderKLWan``, from the configs in ``configs/wan2.1-t2v-1.3b``; 832x480.
* ``wan2.2-t2v-a14b`` Wan 2.2 T2V A14B: two ``WanTransformer3DModel`` experts (14.29 B parameters each;
                      high noise above ``boundary_ratio`` 0.875, low noise below), the Wan 2.1 VAE and
                      UMT5-XXL, flow shift 3.0; 832x480 (``configs/wan2.2-t2v-a14b``; one transformer
                      config serves both experts, as the released ones share it).
* ``wan2.2-ti2v-5b``  Wan 2.2 TI2V 5B: one 5.0 B transformer on the 48-channel Wan 2.2 VAE (2x2 patchify
                      inside, 16x in space), flow shift 5.0; 1280x704 (``configs/wan2.2-ti2v-5b``).
* ``ltx-video-2b``    LTX-Video 0.9.5: ``LTXVideoTransformer3DModel`` (1.92 B parameters), the 0.9.5
                      ``AutoencoderKLLTXVideo`` (32x in space, 8x in time, 128 channels) and T5-XXL (4.76 B;
                      kept on the CPU), fixed-shift flow schedule; 704x512 (``configs/ltx-video-2b``).
* ``ltx-video-13b``   LTX-Video 0.9.7 13B: the 13.04 B transformer on the same VAE and text encoder; 704x512.
* ``cogvideox-2b``, ``cogvideox-5b``  CogVideoX 1.0: ``CogVideoXTransformer3DModel`` (1.69 B, sin-cos positions /
                      5.57 B, 3D RoPE), ``AutoencoderKLCogVideoX`` (8x in space, 4x in time, 16 channels), T5-XXL
                      (kept on the CPU), the v-prediction DDIM schedule; 720x480.
* ``cogvideox1.5-5b`` CogVideoX 1.5 5B (5.57 B, two latent frames a patch); 1360x768.
* ``hunyuanvideo``    HunyuanVideo (guidance-distilled): ``HunyuanVideoTransformer3DModel`` (12.82 B; 20 dual-stream and
                      40 single-stream blocks), ``AutoencoderKLHunyuanVideo`` (8x in space, 4x in time, 16 channels),
                      the Llama-3-8B text encoder and CLIP-L (pooled; both kept on the CPU), flow shift 7; 960x544
                      (``configs/hunyuanvideo``; the pipeline's default 1280x720 through ``size``).
* ``wan-tiny``        a 2-layer Wan transformer with a tiny AutoencoderKLWan (tests' size); 256x256.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..backbone.base import Backbone
from ..backbone.components import from_components, write_clip_tokenizer
from ..errors import BadInput

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {
    "zeroscope-576w": {"size": (576, 320)},
    "modelscope-256": {"size": (256, 256)},
    "shapes": {"size": (32, 32)},
    "tiny": {"size": (16, 16)},
    "wan2.1-t2v-1.3b": {"size": (832, 480)},
    "wan2.2-t2v-a14b": {"size": (832, 480)},
    "wan2.2-ti2v-5b": {"size": (1280, 704)},
    "ltx-video-2b": {"size": (704, 512)},
    "ltx-video-13b": {"size": (704, 512)},
    "cogvideox-2b": {"size": (720, 480)},
    "cogvideox-5b": {"size": (720, 480)},
    "cogvideox1.5-5b": {"size": (1360, 768)},
    "hunyuanvideo": {"size": (960, 544)},
    "wan-tiny": {"size": (256, 256)},
}


def _tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="fastdm-tok-"))
    write_clip_tokenizer(folder, max_length=max_length)
    return CLIPTokenizer.from_pretrained(str(folder))


def _zeroscope(device, dtype, size):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {n: json.loads((CONFIGS / "zeroscope-576w" / f"{n}.json").read_text()) for n in ("unet", "text_encoder", "vae", "scheduler")}
    # built where they will run (random init on the GPU is seconds; on the CPU then moved, ~40 s)
    with torch.device(device):
        unet = UNet3DConditionModel.from_config(cfg["unet"])
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg["text_encoder"].items() if k != "architectures"}))
        vae = AutoencoderKL.from_config(cfg["vae"])
    sched = DDIMScheduler.from_config(cfg["scheduler"])
    return from_components(unet=unet, text_encoder=text, tokenizer=_tokenizer(77), scheduler=sched, vae=vae,
                           path="preset:zeroscope-576w", native_size=size, device=device, dtype=dtype)


def _wan(device, dtype, size, preset: str = "wan2.1-t2v-1.3b", boundary_ratio: float | None = None):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    from ..backbone.components import DEFAULT_WORDS
    from ..backbone.wan import MAX_TEXT_TOKENS, write_t5_tokenizer

    folder = CONFIGS / preset
    cfg = {n: json.loads((folder / f"{n}.json").read_text()) for n in ("transformer", "text_encoder", "vae", "scheduler")}
    tok_dir = Path(tempfile.mkdtemp(prefix="fastdm-t5tok-"))
    write_t5_tokenizer(tok_dir, DEFAULT_WORDS, max_length=MAX_TEXT_TOKENS)
    default = torch.get_default_dtype()
    experts = {}
    with torch.device(device):  # built where they will run
        transformer = WanTransformer3DModel.from_config(cfg["transformer"])
        vae = AutoencoderKLWan.from_config(cfg["vae"])
    if boundary_ratio is not None:  # the low-noise expert waits in host memory (the backbone moves it in at the boundary)
        with torch.device(device if str(device) in ("meta", "cpu") else "cpu"):
            experts = {"transformer_2": WanTransformer3DModel.from_config(cfg["transformer"]), "boundary_ratio": boundary_ratio}
    with torch.device(device if str(device) == "meta" else "cpu"):  # the text encoder stays on the CPU
        # UMT5-XXL is built in the dtype it will be kept in (5.7 B parameters: 23 GB in fp32)
        torch.set_default_dtype(torch.float32 if dtype == torch.float32 else torch.bfloat16)
        try:
            text = UMT5EncoderModel(UMT5Config.from_dict(cfg["text_encoder"]))
        finally:
            torch.set_default_dtype(default)
    sched = UniPCMultistepScheduler.from_config(cfg["scheduler"])
    return from_components(transformer=transformer, text_encoder=text, tokenizer=T5TokenizerFast.from_pretrained(str(tok_dir)),
                           scheduler=sched, vae=vae, path=f"preset:{preset}", native_size=size, device=device, dtype=dtype,
                           **experts)


def _t5_family(device, dtype, size, preset: str):
    """LTX-Video and CogVideoX presets: a transformer, its VAE, T5-XXL (on the CPU) and the scheduler, from configs."""
    import diffusers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from ..backbone.components import DEFAULT_WORDS
    from ..backbone.flow import write_t5_tokenizer

    folder = CONFIGS / preset
    cfg = {n: json.loads((folder / f"{n}.json").read_text()) for n in ("transformer", "text_encoder", "vae", "scheduler")}
    kinds = {"transformer": "LTXVideoTransformer3DModel", "vae": "AutoencoderKLLTXVideo", "scheduler": "FlowMatchEulerDiscreteScheduler"} \
        if preset.startswith("ltx") else {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX",
                                          "scheduler": "CogVideoXDDIMScheduler"}
    length = 128 if preset.startswith("ltx") else int(cfg["transformer"]["max_text_seq_length"])
    tok_dir = Path(tempfile.mkdtemp(prefix="fastdm-t5tok-"))
    write_t5_tokenizer(tok_dir, DEFAULT_WORDS, max_length=length)
    default = torch.get_default_dtype()
    with torch.device(device):  # built where they will run
        transformer = getattr(diffusers, kinds["transformer"]).from_config(cfg["transformer"])
        vae = getattr(diffusers, kinds["vae"]).from_config(cfg["vae"])
    with torch.device(device if str(device) == "meta" else "cpu"):  # the text encoder stays on the CPU
        torch.set_default_dtype(torch.float32 if dtype == torch.float32 else torch.bfloat16)
        try:
            text = T5EncoderModel(T5Config(**cfg["text_encoder"]))
        finally:
            torch.set_default_dtype(default)
    sched = getattr(diffusers, kinds["scheduler"]).from_config(cfg["scheduler"])
    return from_components(transformer=transformer, text_encoder=text, tokenizer=T5TokenizerFast.from_pretrained(str(tok_dir)),
                           scheduler=sched, vae=vae, path=f"preset:{preset}", native_size=size, device=device, dtype=dtype)


def _hunyuan(device, dtype, size, preset: str = "hunyuanvideo"):
    """HunyuanVideo: the transformer, its VAE, Llama (8 B) and CLIP-L text encoders (on the CPU), the shift-7 flow schedule."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from ..backbone.components import DEFAULT_WORDS
    from ..backbone.hunyuan import write_llama_tokenizer

    folder = CONFIGS / preset
    cfg = {n: json.loads((folder / f"{n}.json").read_text()) for n in
           ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler")}
    tok_dir = Path(tempfile.mkdtemp(prefix="fastdm-llamatok-"))
    crop = write_llama_tokenizer(tok_dir, DEFAULT_WORDS)
    default = torch.get_default_dtype()
    with torch.device(device):  # built where they will run
        transformer = HunyuanVideoTransformer3DModel.from_config(cfg["transformer"])
        vae = AutoencoderKLHunyuanVideo.from_config(cfg["vae"])
    with torch.device(device if str(device) == "meta" else "cpu"):  # the text encoders stay on the CPU
        torch.set_default_dtype(torch.float32 if dtype == torch.float32 else torch.bfloat16)
        try:
            text = LlamaModel(LlamaConfig(**{k: v for k, v in cfg["text_encoder"].items() if k != "architectures"}))
            text_2 = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg["text_encoder_2"].items() if k != "architectures"}))
        finally:
            torch.set_default_dtype(default)
    bb = from_components(transformer=transformer, text_encoder=text, tokenizer=PreTrainedTokenizerFast.from_pretrained(str(tok_dir)),
                         scheduler=FlowMatchEulerDiscreteScheduler.from_config(cfg["scheduler"]), vae=vae,
                         path=f"preset:{preset}", native_size=size, device=device, dtype=dtype, text_encoder_2=text_2,
                         tokenizer_2=_tokenizer(77))
    bb.settings = {"crop_start": crop}  # (this offline tokenizer's template prefix; the released one's is the pipeline's 95)
    return bb


def build_backbone(preset: str, device: str = "cpu", dtype: torch.dtype = torch.float32, size=None) -> Backbone:
    """A backbone of the preset's architecture on ``device`` (``"meta"`` for FLOP counting)."""
    if preset not in PRESETS:
        raise BadInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    size = tuple(size or PRESETS[preset]["size"])
    if preset in ("zeroscope-576w", "modelscope-256"):
        return _zeroscope(device, dtype, size)
    if preset in ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"):
        return _wan(device, dtype, size, preset)
    if preset == "wan2.2-t2v-a14b":
        return _wan(device, dtype, size, preset, boundary_ratio=0.875)
    if preset.startswith(("ltx-video", "cogvideox")):
        return _t5_family(device, dtype, size, preset)
    if preset == "hunyuanvideo":
        return _hunyuan(device, dtype, size)
    if preset == "wan-tiny":
        from ..backbone import load_backbone
        from ..testing import build_tiny_wan_model

        folder = build_tiny_wan_model(Path(tempfile.mkdtemp(prefix="fastdm-wan-tiny-")), native_size=size)
        return load_backbone(str(folder), device, dtype)
    if preset == "shapes":
        from ..backbone import default_model_path, load_backbone

        shapes = Path(default_model_path())
        if (shapes / "model_index.json").exists():
            return load_backbone(str(shapes), device, dtype)
        from ..toyworld.world import build_model  # the architecture, random weights

        tok, text, unet, sched = build_model(Path(tempfile.mkdtemp(prefix="fastdm-shapes-")))
        return from_components(unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched, vae=None,
                               path="preset:shapes(random)", native_size=size, device=device, dtype=dtype)
    from ..backbone import load_backbone
    from ..testing import build_tiny_model

    folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="fastdm-tiny-")), size=16, channels=(16, 32))
    return load_backbone(str(folder), device, dtype)
