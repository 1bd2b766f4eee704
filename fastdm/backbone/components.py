"""Backbones from in-memory components, and the small CLIP tokenizer built without downloads.

:func:`from_components` picks the backbone class that accepts the denoiser (the registry
:data:`BACKBONES`; a new backbone family adds its class there) — the loader and the benchmark
presets build backbones only through it. :func:`write_clip_tokenizer` writes a real
``CLIPTokenizer`` folder with a small byte-pair vocabulary (character level plus whole words of a
word list), for tiny test models and for the presets' random-weight models.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ..errors import BadInput, FastDMError, Unsupported
from .base import Backbone


def _registry() -> list[type]:
    from .cogvideox import CogVideoXBackbone
    from .hunyuan import HunyuanVideoBackbone
    from .ltx import LTXBackbone
    from .unet3d import UNet3DBackbone
    from .wan import WanBackbone

    return [UNet3DBackbone, WanBackbone, LTXBackbone, CogVideoXBackbone, HunyuanVideoBackbone]


def from_components(*, denoiser=None, unet=None, transformer=None, text_encoder, tokenizer, scheduler, vae=None, path: str,
                    native_size=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    **family) -> Backbone:
    """The backbone for these components (the first class in the registry that accepts the denoiser).

    The denoiser comes as ``denoiser=`` or under its diffusers folder name (``unet=`` for UNet3D,
    ``transformer=`` for Wan); exactly one of the three. ``family``: what only one family takes
    (Wan 2.2 A14B: ``transformer_2``, ``boundary_ratio``; HunyuanVideo: ``text_encoder_2``,
    ``tokenizer_2``)."""
    given = [m for m in (denoiser, unet, transformer) if m is not None]
    if len(given) != 1:
        raise BadInput("from_components takes exactly one of its denoiser=, unet= and transformer= arguments")
    denoiser = given[0]
    for cls in _registry():
        if cls.accepts(denoiser):
            takes = inspect.signature(cls.__init__).parameters
            extra = [k for k in family if k not in takes]
            if extra:
                raise Unsupported(f"{cls.denoiser_class} ({cls.family}) does not use {', '.join(extra)}; "
                                  "this folder mixes components of another family")
            keyword = getattr(cls, "denoiser_keyword", "unet")
            return cls(**{keyword: denoiser}, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                       path=path, native_size=native_size, device=device, dtype=dtype, **family)
    names = "; ".join(f"{c.denoiser_class} ({c.family})" for c in _registry())
    raise Unsupported(f"unsupported denoiser class {type(denoiser).__name__}; fastdm runs {names}")


# Words that get a single token each; anything else falls back to characters.
DEFAULT_WORDS = (
    "a an the moving left right up down red green blue yellow magenta cyan white black orange purple "
    "circle square triangle ball box car dog cat on background"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table used by GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: str | Path, words=DEFAULT_WORDS, max_length: int = 16) -> None:
    """Write vocab.json/merges.txt/tokenizer_config.json for a small CLIP BPE tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in seen:
                merges.append(f"{pair[0]} {pair[1]}")
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )


