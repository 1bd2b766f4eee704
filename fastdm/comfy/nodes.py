"""fastdm's ComfyUI nodes, on the classic contract (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``).

The data flow is ComfyUI's own: **Load Pipeline** -> ``FASTDM_PIPELINE``; **Load Video** -> IMAGE (frames
as a batch), fps, frame count; **Edit** (pipeline, IMAGE, prompts, optional MASK or boxes) -> IMAGE (the
edited frames at the working size), MASK (the mask the edit used), STRING (the JSON report);
**Auto Mask** -> MASK at the frames' size, to look at or change with ComfyUI's mask nodes before the
edit; **Save Video** writes mp4 or gif into ComfyUI's output folder.

Every edit goes through :func:`fastdm.request.edit_frames`, the request layer under ``fastdm-edit``,
so its checks and one-line messages are the command line's. ComfyUI runs nodes under
``torch.inference_mode()``; loading and editing leave it (an edit backpropagates into the model's
tapped layers). Each step advances ComfyUI's progress bar, sends a preview every ``preview_every``
steps and checks ComfyUI's interrupt flag, so Cancel ends the edit within one step; whatever the
edit allocated is released in a ``finally`` (ComfyUI's interrupt is a ``BaseException`` in current
copies). On CUDA, before an edit, ComfyUI's own loaded models are unloaded through its model
management and its cache emptied; the report's ``comfyui`` entry says what was freed.

ComfyUI's modules (``comfy.*``, ``folder_paths``) are imported only inside ComfyUI; outside it the
nodes still import and run (tests call them directly) with plain defaults.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FastDMError

CATEGORY = "fastdm"
PIPELINE = "FASTDM_PIPELINE"  # the custom socket type between the loader and the edit / mask nodes
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
PRESETS = ("default", "paper")
PLANS = ("fast", "fast-seq", "lean", "fit free memory")


# -- ComfyUI's modules, when running inside it ----------------------------------------------------
def _comfy(name: str):
    """``comfy.utils``, ``comfy.model_management`` or ``folder_paths`` inside ComfyUI; None outside."""
    try:
        import importlib

        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not inside ComfyUI (or a ComfyUI without that module)
        return None


def _folder(kind: str) -> Path | None:
    fp = _comfy("folder_paths")
    if fp is None:
        return None
    if kind == "input":
        return Path(fp.get_input_directory())
    if kind == "output":
        return Path(fp.get_output_directory())
    return None


def _diffusers_folders() -> list[str]:
    """Model folders under ComfyUI's ``models/diffusers`` (each holding a ``model_index.json``)."""
    fp = _comfy("folder_paths")
    if fp is None:
        return []
    try:
        roots = fp.get_folder_paths("diffusers")
    except Exception:  # noqa: BLE001 - a ComfyUI without that folder kind
        return []
    names = set()
    for root in roots:
        if os.path.isdir(root):
            names.update(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "model_index.json")))
    return sorted(names)


def _model_path(model: str, model_path: str = "") -> str:
    """A bundled model's name, a folder under ComfyUI's ``models/diffusers``, or ``model_path`` (wins)."""
    from ..backbone import BUNDLED

    if model_path and model_path.strip():
        return model_path.strip()
    if model in BUNDLED:
        return model
    fp = _comfy("folder_paths")
    if fp is not None:
        for root in fp.get_folder_paths("diffusers"):
            if os.path.isdir(os.path.join(root, model)):
                return os.path.join(root, model)
    return model


@contextlib.contextmanager
def _grad_enabled():
    """Out of ComfyUI's ``inference_mode``, with autograd on (tensors made in inference mode cannot be
    saved for backward: the model is loaded and edited here)."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        yield


def _interrupt_check() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's InterruptProcessingException


def _free_comfy_models(device: str) -> dict:
    """On CUDA: unload the models ComfyUI manages and empty its cache; what that freed."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return {"device": device, "unloaded": False, "freed_bytes": 0}
    mm = _comfy("comfy.model_management")
    before = torch.cuda.mem_get_info()[0]
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()
    torch.cuda.empty_cache()
    after = torch.cuda.mem_get_info()[0]
    return {"device": device, "unloaded": mm is not None, "freed_bytes": int(after - before), "free_bytes": int(after)}


def _release(device: str) -> None:
    gc.collect()
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    else:
        import torch

        if device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- tensors <-> ComfyUI's IMAGE / MASK -----------------------------------------------------------
def image_to_frames(image):
    """ComfyUI IMAGE ``[B, H, W, C]`` float 0..1 -> ``(B, H, W, 3)`` uint8 (alpha dropped)."""
    import torch

    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise FastDMError(f"frames: expected a ComfyUI IMAGE batch [frames, height, width, 3], got {shape}")
    return (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def frames_to_image(frames):
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)


def mask_to_array(mask):
    """ComfyUI MASK ``[B, H, W]`` or ``[H, W]`` -> float32 array of the same shape."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise FastDMError(f"mask: expected a ComfyUI MASK [frames, height, width] or [height, width], got {shape}")
    return mask.detach().float().cpu().numpy()


def _preview(pipe, x):
    """A strip of the edited frames (a PIL image) for ComfyUI's progress preview."""
    from PIL import Image

    from ..io.tensors import tensor_to_frames
    from ..io.video import preview_strip

    with pipe.lock:
        frames = tensor_to_frames(pipe.backbone.from_working(x))
    return Image.fromarray(preview_strip(frames, height=128))


# -- the pipeline socket ----------------------------------------------------------------------------
@dataclass
class FastDMPipeline:
    """What ``FASTDM_PIPELINE`` carries: the loaded pipeline and how edits run on it."""

    pipe: object
    model: str
    device: str
    dtype: str
    plan: str
    memory_budget: str | None
    backend: str
    attention: str
    loads: int = 1  # (for tests: a cached pipeline is loaded once)
    info: dict = field(default_factory=dict)

    def request(self, **kw):
        from ..request import EditRequest

        budget = self.memory_budget
        plan = None if budget is not None or self.plan == "fit free memory" else self.plan
        if self.plan == "fit free memory" and budget is None:
            budget = str(_free_bytes(self.device)) if self.device == "cuda" else None
            plan = None if budget else "fast"
        return EditRequest(model=self.model, device=self.device, dtype=self.dtype, plan=plan, memory_budget=budget,
                           backend=self.backend, attention=self.attention, quiet=True, **kw)


def _free_bytes(device: str) -> int:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    return 0


def _auto_device(device: str) -> str:
    import torch

    if device == "auto":
        mm = _comfy("comfy.model_management")
        if mm is not None:
            return "cuda" if mm.get_torch_device().type == "cuda" else "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# -- nodes -------------------------------------------------------------------------------------------
class FastDMLoadPipeline:
    DESCRIPTION = ("Loads a DreamMotion pipeline once (ComfyUI keeps it while its inputs stay the same): a bundled "
                   "model by name, a diffusers folder under models/diffusers, or a folder path.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..backbone import BUNDLED

        return {"required": {
                    "model": ([*BUNDLED, *_diffusers_folders()], {"default": BUNDLED[0]}),
                    "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
                    "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto"}),
                    "plan": (list(PLANS), {"default": "fast"}),
                    "attention": (["sdpa", "xformers"], {"default": "sdpa"}),
                    "backend": (["eager", "compile", "cudagraphs", "ort", "trt"], {"default": "eager"}),
                },
                "optional": {
                    "model_path": ("STRING", {"default": "", "tooltip": "a diffusers folder; overrides model"}),
                    "memory_budget": ("STRING", {"default": "", "tooltip": "e.g. 12G: the fastest plan that fits (overrides plan)"}),
                }}

    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model=None, model_path=None, memory_budget=None):
        # (ComfyUI checks the other choices itself; it skips its list check for `model`, checked here)
        from ..backbone.loader import check_model_folder
        from ..driver.budget import parse_size

        try:
            if model is not None or model_path:
                check_model_folder(_model_path(model or "", model_path or ""))
            if memory_budget and memory_budget.strip():
                parse_size(memory_budget)
        except FastDMError as e:
            return str(e)
        return True

    def load(self, model, device="auto", dtype="auto", plan="fast", attention="sdpa", backend="eager", model_path="",
             memory_budget=""):
        from ..driver import DreamMotionPipeline
        from ..driver.progress import quiet_libraries

        device = _auto_device(device)
        if dtype == "auto":
            dtype = "fp32" if device == "cpu" else "bf16"
        path = _model_path(model, model_path)
        freed = _free_comfy_models(device)  # room for the model before it loads
        quiet_libraries()
        with _grad_enabled():  # (parameters made under inference_mode could never be edited through)
            pipe = DreamMotionPipeline.from_pretrained(path, device, dtype, attention=attention)
        holder = FastDMPipeline(pipe, path, device, dtype, plan, memory_budget.strip() or None, backend, attention,
                                info={"freed_before_load": freed, "load_id": f"{os.getpid()}-{id(pipe):x}-{time.time_ns()}"})
        return (holder,)


class FastDMLoadVideo:
    DESCRIPTION = ("Reads a video (mp4, webm, mov, gif, ...) frame by frame from ComfyUI's input folder or a path; "
                   "frames are resized as they are decoded, so only frames of the asked size are held.")

    @classmethod
    def INPUT_TYPES(cls):
        folder = _folder("input")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTS)) if folder and folder.is_dir() else []
        return {"required": {
                    "video": (files or [""], {"tooltip": "a file in ComfyUI's input folder"}),
                    "frame_cap": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "at most this many frames (0: all)"}),
                    "stride": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "every n-th frame"}),
                    "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "0: the video's own size"}),
                    "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8}),
                },
                "optional": {"path": ("STRING", {"default": "", "tooltip": "a video path; overrides video"}),
                             "start_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                                         "tooltip": "read from this time in the video"}),
                             "end_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                                       "tooltip": "read up to this time (0: the end)"})}}

    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("frames", "fps", "frame_count")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @staticmethod
    def _path(video: str, path: str = "") -> Path:  # (VALIDATE_INPUTS takes `video`: ComfyUI skips its list check)
        if path and path.strip():
            return Path(path.strip()).expanduser()
        folder = _folder("input")
        return (folder / video) if folder is not None else Path(video)

    @classmethod
    def VALIDATE_INPUTS(cls, video=None, path=None, width=None, height=None, start_seconds=None, end_seconds=None):
        p = cls._path(video or "", path or "")
        if end_seconds and start_seconds is not None and end_seconds <= start_seconds:
            return f"end_seconds ({end_seconds:g}) must come after start_seconds ({start_seconds:g}), or be 0 (the end)"
        if not str(video or "").strip() and not (path or "").strip():
            return "no video: put one in ComfyUI's input folder and pick it, or give a path"
        if not p.is_file() and not p.is_dir():
            return f"video '{p}' does not exist; check the path"
        if width is not None and height is not None and (width == 0) != (height == 0):
            return "give both width and height, or neither (0)"
        return True

    @classmethod
    def IS_CHANGED(cls, video, path="", **_):
        p = cls._path(video, path)
        try:
            st = p.stat()
        except OSError:
            return ""
        return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def load(self, video, frame_cap=0, stride=1, width=0, height=0, path="", start_seconds=0.0, end_seconds=0.0):
        from ..io import read_frames

        p = self._path(video, path)
        size = (width, height) if width and height else None
        frames, fps, _ = read_frames(p, frames=frame_cap or None, stride=stride, size=size, start=start_seconds or None,
                                     end=end_seconds or None)
        return (frames_to_image(frames), float(fps) / stride, int(frames.shape[0]))


def _edit_inputs():
    return {
        "pipeline": (PIPELINE,),
        "frames": ("IMAGE",),
        "source_prompt": ("STRING", {"multiline": True, "default": "a red circle moving right"}),
        "target_prompt": ("STRING", {"multiline": True, "default": "a blue circle moving right"}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
    }


def _check_prompts(source_prompt, target_prompt):
    for name, value in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        if value is not None and not str(value).strip():
            return f"{name} is empty; describe the {'input video' if name == 'source_prompt' else 'edit you want'}"
    return True


class FastDMAutoMask:
    DESCRIPTION = ("The automatic edit mask alone: where the model's cross-attention puts the words that differ "
                   "between the prompts (one extra model call). White = editable, at the frames' size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _edit_inputs()}

    RETURN_TYPES = ("MASK", "STRING")
    RETURN_NAMES = ("mask", "report")
    FUNCTION = "mask"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, source_prompt=None, target_prompt=None):
        return _check_prompts(source_prompt, target_prompt)

    def mask(self, pipeline, frames, source_prompt, target_prompt, seed=0):
        import torch

        from ..request import auto_mask_frames

        raw = image_to_frames(frames)
        try:
            with _grad_enabled():
                mask, report = auto_mask_frames(pipeline.request(input="the frames input", source_prompt=source_prompt,
                                                                 target_prompt=target_prompt, seed=seed),
                                                raw, pipe=pipeline.pipe)
        finally:
            _release(pipeline.device)
        if mask is None:  # no distinct region: everything editable, and the report says why
            mask = torch.ones(raw.shape[:3])
        else:
            mask = torch.from_numpy(mask)
        return (mask, json.dumps(report))


class FastDMEdit:
    DESCRIPTION = ("DreamMotion edit: optimizes the frames so they match the target prompt while keeping the source "
                   "video's structure and motion. Returns the edited frames at the model's working size, the mask "
                   "used and the JSON report.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    **_edit_inputs(),
                    "preset": (list(PRESETS), {"default": "default"}),
                    "steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "0: the preset's step count"}),
                    "stop_when_settled": ("BOOLEAN", {"default": False, "tooltip": "steps=auto: stop once the edit stops moving (steps is the cap)"}),
                    "mask_mode": (["auto", "none"], {"default": "auto", "tooltip": "without a mask or boxes input"}),
                    "window": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "working frames per window for long clips (0: the model's length)"}),
                    "guidance_scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 50.0, "step": 0.1}),
                    "s_ssm_weight": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e6, "step": 10.0, "tooltip": "-1: the preset's"}),
                    "t_ssm_weight": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e6, "step": 10.0, "tooltip": "-1: the preset's"}),
                    "preview_every": ("INT", {"default": 4, "min": 0, "max": 1000, "tooltip": "a preview every n steps (0: none)"}),
                },
                "optional": {"mask": ("MASK",),
                             "boxes": ("STRING", {"default": "", "multiline": True,
                                                  "tooltip": "JSON [[x0, y0, x1, y1], ...] or {\"0\": [...]} in the frames' pixels"})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("frames", "mask", "report")
    FUNCTION = "edit"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, source_prompt=None, target_prompt=None, boxes=None):
        ok = _check_prompts(source_prompt, target_prompt)
        if ok is not True:
            return ok
        if boxes and boxes.strip():
            try:
                json.loads(boxes)
            except json.JSONDecodeError as e:
                return f"boxes are not valid JSON ({e}); expected [[x0, y0, x1, y1], ...]"
        return True

    def edit(self, pipeline, frames, source_prompt, target_prompt, seed=0, preset="default", steps=0, stop_when_settled=False,
             mask_mode="auto", window=0, guidance_scale=7.5, s_ssm_weight=-1.0, t_ssm_weight=-1.0, preview_every=4,
             mask=None, boxes="", unique_id=None):
        import numpy as np
        import torch

        from ..request import edit_frames

        raw = image_to_frames(frames)
        kw = {"preset": None if preset == "default" else preset, "seed": seed, "guidance_scale": guidance_scale,
              "mask": mask_mode, "window": window or None}
        if stop_when_settled:
            kw["steps"] = "auto"
            if steps:
                kw["max_steps"] = steps
        elif steps:
            kw["steps"] = steps
        if s_ssm_weight >= 0:
            kw["s_ssm_weight"] = s_ssm_weight
        if t_ssm_weight >= 0:
            kw["t_ssm_weight"] = t_ssm_weight
        request = pipeline.request(input="the frames input", source_prompt=source_prompt, target_prompt=target_prompt, **kw)
        total = request.config().cap  # (checked here, before anything is freed or run; continuation segments included)
        utils = _comfy("comfy.utils")
        bar = utils.ProgressBar(total) if utils is not None else None
        state = {"run": 0}

        def on_step(pipe, step, t, tensors):
            _interrupt_check()  # Cancel: raises; the finally below releases the edit
            state["run"] = step
            if bar is not None:
                preview = None
                if preview_every and (step % preview_every == 0 or step == total):
                    preview = ("JPEG", _preview(pipe, tensors["x"]), 512)
                bar.update_absolute(min(step, total), total, preview)
            return None

        freed = _free_comfy_models(pipeline.device)
        try:
            with _grad_enabled():
                result, working = edit_frames(request, raw, pipe=pipeline.pipe,
                                              mask=None if mask is None else mask_to_array(mask),
                                              boxes=boxes if boxes and boxes.strip() else None, on_step=on_step,
                                              tensor_inputs=("x", "losses"))
        finally:
            _release(pipeline.device)
        report = result.report
        report["comfyui"] = {"freed_before_edit": freed, "node": unique_id, "pipeline": pipeline.info}
        used = result.mask
        used = torch.ones(working.shape[:3]) if used is None else torch.from_numpy(np.asarray(used, np.float32))
        text = json.dumps(report, default=str)
        # (the report also as the node's UI text: it shows in the queue's history and in /history)
        return {"ui": {"text": [text]}, "result": (frames_to_image(result.frames), used, text)}


class FastDMSaveVideo:
    DESCRIPTION = "Writes frames as an mp4 or a gif into ComfyUI's output folder (shown in the queue's history)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("IMAGE",),
                             "fps": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 240.0, "step": 0.1}),
                             "filename_prefix": ("STRING", {"default": "fastdm"}),
                             "format": (["gif", "mp4"], {"default": "gif"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def save(self, frames, fps=8.0, filename_prefix="fastdm", format="gif"):
        from ..io import write_video

        arr = image_to_frames(frames)
        h, w = arr.shape[1:3]
        fp = _comfy("folder_paths")
        if fp is not None:
            folder, name, counter, subfolder, _ = fp.get_save_image_path(filename_prefix, fp.get_output_directory(), w, h)
        else:
            folder, name, counter, subfolder = os.getcwd(), filename_prefix, 1, ""
        filename = f"{name}_{counter:05}_.{format}"
        write_video(Path(folder) / filename, arr, fps)  # (atomic: a temporary file, then a rename)
        entry = {"filename": filename, "subfolder": subfolder, "type": "output", "format": f"video/{'h264-mp4' if format == 'mp4' else 'gif'}"}
        return {"ui": {"images" if format == "gif" else "videos": [entry], "animated": (True,)}}


NODE_CLASS_MAPPINGS = {
    "FastDMLoadPipeline": FastDMLoadPipeline,
    "FastDMLoadVideo": FastDMLoadVideo,
    "FastDMAutoMask": FastDMAutoMask,
    "FastDMEdit": FastDMEdit,
    "FastDMSaveVideo": FastDMSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FastDMLoadPipeline": "fastdm: Load Pipeline",
    "FastDMLoadVideo": "fastdm: Load Video",
    "FastDMAutoMask": "fastdm: Auto Mask",
    "FastDMEdit": "fastdm: DreamMotion Edit",
    "FastDMSaveVideo": "fastdm: Save Video",
}
