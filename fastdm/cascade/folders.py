"""Stage model folders: checked before any work, loaded one stage at a time.

A stage folder is diffusers-format (``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, and ``vae/`` for latent models). The UNet is a
``UNet3DConditionModel``, either diffusers' or Show-1's (``showone``): a folder whose
``model_index.json`` names a ``showone`` class loads only with ``--trust-remote-code`` and only when
the ``showone`` package (Show-1's code) is importable; otherwise one line says what is missing.

What each kind needs of the UNet (c = image channels, 3; a scheduler with a learned variance,
``variance_type`` ``learned``/``learned_range`` as DeepFloyd IF and Show-1 use, makes the UNet
output 2c channels, the first c the noise prediction):

- ``edit``: a model fastdm can edit with (pixel UNet with c input channels, or a latent one with ``vae/``);
- ``upscale``: pixel space, ``in_channels`` = 2c: [noisy high-res, upsampled low-res];
- ``interpolate``: pixel space, ``in_channels`` = 2c + 1: [noisy, keyframes interpolated in time, keyframe mask];
- ``refine``: latent (``vae/``), ``in_channels`` = the VAE's latent channels.

Checks read only JSON files (configs) and list weight files; nothing is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FastDMError

IMAGE_CHANNELS = 3
LEARNED_VARIANCE = ("learned", "learned_range")
SHOWONE_HINT = ("Show-1's code: clone github.com/showlab/Show-1 and put its folder (the one holding showone/) "
                "on PYTHONPATH, with its requirements")


def _read_json(path: Path, label: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FastDMError(f"{label}: {path} is missing; the model folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastDMError(f"{label}: {path} is not valid JSON ({e}); fix or re-download the model") from None
    if not isinstance(data, dict):
        raise FastDMError(f"{label}: {path} is not a JSON object")
    return data


def is_showone(library) -> bool:
    return isinstance(library, str) and (library == "showone" or library.startswith("showone."))


def showone_class(library: str, cls_name: str, label: str, trust_remote_code: bool):
    """The class a ``["showone...", NAME]`` entry names: only with --trust-remote-code and the package importable."""
    if not trust_remote_code:
        raise FastDMError(f"{label}: the folder names Show-1 classes (showone.{cls_name}), custom code that runs when "
                          "loaded; pass `trust_remote_code` to use it")
    if importlib.util.find_spec("showone") is None:
        raise FastDMError(f"{label}: the folder names Show-1 classes (showone.{cls_name}) but the showone package is "
                          f"not importable; install {SHOWONE_HINT}")
    modules = [library] if library != "showone" else ["showone.models", "showone"]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise FastDMError(f"{label}: importing {name} failed ({e}); install {SHOWONE_HINT}") from None
        if hasattr(module, cls_name):
            return getattr(module, cls_name)
    raise FastDMError(f"{label}: the showone package has no class {cls_name} (looked in {', '.join(modules)}); "
                      "use the Show-1 code the folder was made for")


def stage_component_class(root: Path, name: str, spec, label: str, trust_remote_code: bool):
    """The class of one component of a stage folder: Show-1's own, or what the loader resolves."""
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and is_showone(spec[0]):
        return showone_class(spec[0], spec[1], label, trust_remote_code)
    from ..backbone.loader import component_class

    try:
        return component_class(root, name, spec, trust_remote_code)
    except FastDMError as e:
        raise FastDMError(f"{label}: {e}") from None


@dataclass
class FolderInfo:
    """What the checks learned about a stage folder (from its JSON files only)."""

    path: Path
    index: dict
    unet_config: dict
    latent: bool
    learned_variance: bool
    showone: bool
    vae_latent_channels: int | None

    @property
    def image_channels(self) -> int:
        out = int(self.unet_config.get("out_channels", 0))
        return out // 2 if self.learned_variance else out


def check_stage_folder(path: str, kind: str, label: str, *, trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> FolderInfo:
    """Every check of one stage folder that needs no weights; one-line :class:`FastDMError` on failure."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FastDMError(f"{label}: model folder '{path}' does not exist; download the model to a local folder and "
                          "point the cascade file's 'model' at it")
    if not p.is_dir():
        raise FastDMError(f"{label}: model '{path}' is a file; give the diffusers-format folder that holds model_index.json")
    index = _read_json(p / "model_index.json", label)
    need = ["unet", "text_encoder", "tokenizer", "scheduler"] + (["vae"] if kind == "refine" else [])
    missing = [c for c in need if not (p / c).is_dir()]
    if missing:
        raise FastDMError(f"{label}: '{path}' lacks {', '.join(c + '/' for c in missing)}; a {kind} stage folder holds "
                          f"{', '.join(need)}")
    for c in need:
        spec = index.get(c)
        if spec is None or (isinstance(spec, list) and spec[:1] == [None]):
            raise FastDMError(f"{label}: model_index.json has no entry for '{c}'")
    unet_spec = index["unet"]
    if not (isinstance(unet_spec, list) and len(unet_spec) == 2 and unet_spec[1] == "UNet3DConditionModel"
            and (unet_spec[0] == "diffusers" or is_showone(unet_spec[0]))):
        raise FastDMError(f"{label}: the unet is {unet_spec!r}; a {kind} stage needs a UNet3DConditionModel "
                          "(diffusers, or Show-1's showone)")
    showone = any(isinstance(v, list) and len(v) == 2 and is_showone(v[0]) for k, v in index.items() if k in need)
    for c in need:  # resolves classes: showone gating, custom code, missing classes
        stage_component_class(p, c, index[c], label, trust_remote_code)
    from ..backbone.loader import check_weights

    for c in ("unet", "text_encoder") + (("vae",) if kind == "refine" else ()):
        try:
            check_weights(p / c, allow_pickle)
        except FastDMError as e:
            raise FastDMError(f"{label}: {e}") from None
    cfg = _read_json(p / "unet" / "config.json", label)
    sched = _read_json(p / "scheduler" / "scheduler_config.json", label)
    has_vae = (p / "vae").is_dir() and isinstance(index.get("vae"), list) and index["vae"][:1] != [None]
    vae_channels = int(_read_json(p / "vae" / "config.json", label).get("latent_channels", 4)) if has_vae else None
    info = FolderInfo(p, index, cfg, has_vae, str(sched.get("variance_type")) in LEARNED_VARIANCE, showone, vae_channels)
    _check_channels(info, kind, label)
    return info


def _check_channels(info: FolderInfo, kind: str, label: str) -> None:
    cin, cout = int(info.unet_config.get("in_channels", 0)), int(info.unet_config.get("out_channels", 0))
    c = info.image_channels
    lv = " (learned variance: half of out_channels)" if info.learned_variance else ""
    if kind in ("upscale", "interpolate"):
        if info.latent:
            raise FastDMError(f"{label}: the folder has a vae/ (latent model); a {kind} stage runs in pixel space")
        want = 2 * IMAGE_CHANNELS + (1 if kind == "interpolate" else 0)
        what = ("[noisy, upsampled low-res]" if kind == "upscale" else "[noisy, interpolated keyframes, keyframe mask]")
        if c != IMAGE_CHANNELS or cin != want:
            raise FastDMError(f"{label}: its UNet has in_channels {cin}, out_channels {cout}{lv}; a {kind} UNet takes "
                              f"{want} input channels {what} and predicts {IMAGE_CHANNELS}")
    elif kind == "refine":
        if c != info.vae_latent_channels or cin != info.vae_latent_channels:
            raise FastDMError(f"{label}: its UNet has in_channels {cin}, out_channels {cout}{lv}, the VAE "
                              f"{info.vae_latent_channels} latent channels; a refine stage needs a latent text-to-video "
                              "UNet on the VAE's latents")
    elif kind == "edit":
        want = info.vae_latent_channels if info.latent else IMAGE_CHANNELS
        if cin != want or c != want:
            raise FastDMError(f"{label}: its UNet has in_channels {cin}, out_channels {cout}{lv}; the edit stage needs a "
                              f"text-to-video UNet on {'the VAE latents' if info.latent else 'RGB pixels'} ({want} channels)")


@dataclass
class StageModel:
    """A loaded stage model (UNet, text encoder, tokenizer, scheduler, optional VAE) on one device."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: torch.nn.Module | None
    info: FolderInfo
    device: torch.device
    dtype: torch.dtype

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.vae) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        length = tok.model_max_length if tok.model_max_length and tok.model_max_length <= 512 else 77
        enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        kwargs = {}
        if "T5" in type(self.text_encoder).__name__:  # T5 encoders (Show-1, DeepFloyd IF) take the padding mask
            kwargs["attention_mask"] = enc.attention_mask.to(self.device)
        return self.text_encoder(enc.input_ids.to(self.device), **kwargs)[0].to(self.dtype)

    def release_text_encoder(self) -> None:
        self.text_encoder = None


def load_stage_model(info: FolderInfo, label: str, *, device: torch.device, dtype: torch.dtype,
                     trust_remote_code: bool = False, allow_pickle: bool = False) -> StageModel:
    from ..backbone.loader import load_component

    comps = {}
    for name in ("unet", "text_encoder", "tokenizer", "scheduler") + (("vae",) if info.latent else ()):
        cls = stage_component_class(info.path, name, info.index[name], label, trust_remote_code)
        try:
            comps[name] = load_component(cls, info.path / name, allow_pickle)
        except FastDMError as e:
            raise FastDMError(f"{label}: {e}") from None
        except (OSError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FastDMError(f"{label}: could not load '{name}' from {info.path / name}: {msg}") from None
    for name in ("unet", "text_encoder", "vae"):
        if name in comps:
            comps[name] = comps[name].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StageModel(comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], comps.get("vae"), info,
                      torch.device(device), dtype)
