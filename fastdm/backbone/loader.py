"""Load a backbone from a local diffusers-format folder.

Layout: ``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and an
optional ``vae/`` (with it the edit runs in latent space, without it in pixel space). A Wan 2.1
folder holds ``transformer/`` in place of ``unet/`` (and needs ``accelerate`` installed, which
diffusers uses to load ``WanTransformer3DModel``). An optional ``fastdm.json`` may give
``{"native_size": [W, H], "frames": N}`` (N: the video frames it was trained on, the default edit window) and
family settings the backbone reads (HunyuanVideo: ``crop_start``, ``max_sequence_length``).

Weights load from safetensors only unless ``allow_pickle``; a component whose class is not a
diffusers/transformers class (custom model code shipped in the folder) loads only with
``trust_remote_code``. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from ..errors import FastDMError
from .base import Backbone

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
WAN_REQUIRED = ("transformer", "text_encoder", "tokenizer", "scheduler")  # Wan 2.1 (diffusers' WanPipeline layout)


def _required(p: Path) -> tuple[str, ...]:
    """The layout of folder ``p``: UNet3D (``unet/``) or Wan (``transformer/`` and no ``unet/``)."""
    return WAN_REQUIRED if (p / "transformer").is_dir() and not (p / "unet").is_dir() else REQUIRED
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FastDMError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


BUNDLED = ("shapes", "shapes-dit")  # models shipped in fastdm/assets/models/, selectable by name


def bundled_model_path(name: str = "shapes") -> str:
    """The folder of a model bundled with the package (``shapes``: tools/train_shapes.py, a UNet3D;
    ``shapes-dit``: tools/train_shapes_dit.py, a Wan transformer)."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "models", name)


def resolve_model(path: str | os.PathLike | None) -> str:
    """``--model`` as a folder: None is the default bundled model; a bundled name (``shapes``,
    ``shapes-dit``) is that model unless a folder of that name exists here."""
    if path is None:
        return bundled_model_path()
    path = str(path)
    if path in BUNDLED and not Path(path).exists():
        return bundled_model_path(path)
    return path


def _check_folder(path: str | None) -> Path:
    name, path = path, resolve_model(path)
    p = Path(path).expanduser()
    if not p.exists() and (name is None or name in BUNDLED):
        raise FastDMError(f"the bundled model '{name or 'shapes'}' is missing from this install ({path}); reinstall fastdm "
                          "or pass `model` with a local diffusers-format folder")
    if not p.exists():
        looks_like_hub_id = "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1
        hint = (
            f"`model='{path}'` is not a local folder and fastdm never downloads; if it is a hub id, download it first "
            f"(huggingface-cli download {path} --local-dir DIR) and pass `model=DIR`"
            if looks_like_hub_id
            else f"model folder '{path}' does not exist; pass `model` with a local diffusers-format folder "
            "(the weights must be downloaded to a local folder first)"
        )
        raise FastDMError(hint)
    if not p.is_dir():
        raise FastDMError(f"`model='{path}'` is a file; pass the diffusers-format folder that holds model_index.json")
    if not (p / "model_index.json").is_file():
        raise FastDMError(f"'{path}' has no model_index.json; pass the root of a diffusers-format model folder")
    required = _required(p)
    missing = [c for c in required if not (p / c).is_dir()]
    if missing:
        alt = " (a Wan model: transformer/ in place of unet/)" if required is REQUIRED else ""
        raise FastDMError(f"model folder '{path}' lacks {', '.join(c + '/' for c in missing)}; it must hold {', '.join(required)}{alt} (and vae/ for latent models)")
    if required is WAN_REQUIRED and importlib.util.find_spec("accelerate") is None:
        raise FastDMError("loading a Wan model needs the accelerate package, which diffusers uses for WanTransformer3DModel: "
                          "pip install accelerate (or pip install 'fastdm[wan]')")
    return p


def check_model_folder(path: str | os.PathLike) -> Path:
    """Fail fast (before any work) unless ``path`` looks like a complete local diffusers-format folder."""
    return _check_folder(str(path))


def component_class(root: Path, name: str, spec, trust_remote_code: bool):
    """Resolve the class a model_index.json entry names: ``[library, class_name]``."""
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
        raise FastDMError(f"model_index.json: entry '{name}' must be [library, class], got {spec!r}")
    library, cls_name = spec
    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
        cls = getattr(module, cls_name, None)
        if cls is None:
            raise FastDMError(f"model_index.json: {library} has no class {cls_name} (component '{name}'); upgrade {library} or fix the folder")
        return cls
    code = root / name / f"{library}.py"
    if not code.is_file():
        raise FastDMError(f"model_index.json: component '{name}' names library '{library}', which is neither diffusers nor transformers nor a file {name}/{library}.py")
    if not trust_remote_code:
        raise FastDMError(f"component '{name}' uses custom model code ({name}/{library}.py); read it, then pass `trust_remote_code` to run it")
    spec_ = importlib.util.spec_from_file_location(f"fastdm_custom_{name}_{library}", code)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    if not hasattr(module, cls_name):
        raise FastDMError(f"{name}/{library}.py defines no class {cls_name}")
    return getattr(module, cls_name)


def check_weights(folder: Path, allow_pickle: bool) -> None:
    files = [f.name for f in folder.iterdir() if f.is_file()]
    has_st = any(f.endswith(".safetensors") for f in files)
    has_pickle = any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    if not has_st and has_pickle and not allow_pickle:
        raise FastDMError(
            f"'{folder}' holds only pickle weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors or pass `allow_pickle` if you trust them"
        )
    if not has_st and not has_pickle:
        raise FastDMError(f"'{folder}' holds no weights (.safetensors); the model folder is incomplete")


def load_component(cls, folder: Path, allow_pickle: bool):
    kwargs = {"local_files_only": True}
    if hasattr(cls, "from_pretrained"):
        try:
            # None = prefer safetensors, fall back to pickle; True = safetensors only
            return cls.from_pretrained(str(folder), use_safetensors=None if allow_pickle else True, **kwargs)
        except TypeError:  # tokenizers/schedulers take no use_safetensors
            return cls.from_pretrained(str(folder), **kwargs)
    raise FastDMError(f"class {cls.__name__} cannot be loaded from a folder (no from_pretrained)")


def load_backbone(
    path: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Backbone:
    """Load the model in ``path`` behind fastdm's :class:`Backbone` interface."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastDMError("`device=cuda` was asked for but no CUDA GPU is available; use `device=cpu`")
    root = _check_folder(None if path is None else str(path))
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastDMError(f"{root / 'model_index.json'} is not valid JSON ({e}); fix or re-download the model") from None
    comps = {}
    required = _required(root)

    def present(name: str) -> bool:  # an optional component the folder has (model_index names it, not [null, null])
        return (root / name).is_dir() and isinstance(index.get(name), list) and index[name][0] is not None

    # vae/ for latent models; a transformer folder's second expert (Wan 2.2 A14B) or second text encoder (HunyuanVideo: CLIP)
    optional = tuple(n for n in ("vae", "transformer_2", "text_encoder_2", "tokenizer_2")
                     if present(n) and (n == "vae" or required is WAN_REQUIRED))
    for name in required + optional:
        if name not in index:
            raise FastDMError(f"model_index.json has no entry for '{name}'")
        cls = component_class(root, name, index[name], trust_remote_code)
        if name in ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "vae"):
            check_weights(root / name, allow_pickle)
        try:
            comps[name] = load_component(cls, root / name, allow_pickle)
        except FastDMError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FastDMError(f"could not load '{name}' from {root / name}: {msg}") from None
    native = None
    meta = root / "fastdm.json"
    frames = None
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
            native, frames = info.get("native_size"), info.get("frames")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise FastDMError(f"{meta} is not a JSON object ({e}); fix it or delete it") from None
    from .components import from_components

    family = {"transformer_2": comps["transformer_2"], "boundary_ratio": index.get("boundary_ratio")} \
        if "transformer_2" in comps else {}
    family.update({n: comps[n] for n in ("text_encoder_2", "tokenizer_2") if n in comps})
    backbone = from_components(denoiser=comps[required[0]], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                               scheduler=comps["scheduler"], vae=comps.get("vae"), path=str(root), native_size=native,
                               device=device, dtype=dtype, **family)
    if isinstance(frames, int) and frames > 0:
        backbone._native_frames = frames  # video frames it was trained on: the default edit window
    backbone.settings = info if meta.is_file() and isinstance(info, dict) else {}  # fastdm.json (family settings)
    return backbone


def default_model_path() -> str:
    """The model bundled with the package: the shapes model trained by tools/train_shapes.py."""
    return bundled_model_path("shapes")
