"""One edit request, below every front end: ``EditRequest`` and :func:`run`.

``fastdm-edit`` turns its flags into an :class:`EditRequest`; ``fastdm-batch`` turns each manifest
line into one; ``fastdm-app`` turns its form into one; the cascade runner takes one. :func:`run`
checks it (every check before the model loads, in one order, each failure one
:class:`~fastdm.errors.FastDMError` line), reads the input, edits (or cascades) and writes the
outputs atomically, and returns the :class:`~fastdm.driver.pipeline.EditResult`: the front ends
get the result object, never a report re-read from disk.

Field names are the command line's (``--guidance-scale`` is ``guidance_scale``); settings left
``None`` come from the preset (:data:`fastdm.driver.config.PRESETS`). ``settings`` sets any other
:class:`~fastdm.driver.config.EditConfig` field by its own name.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .driver.config import EditConfig, resolve_config
from .driver.plan import PLANS
from .driver.progress import progress, quiet_libraries
from .errors import BadInput, FastDMError, Unsupported

# request fields that map to EditConfig fields (None: the preset's value)
CONFIG_FIELDS = ("steps", "lr", "optimizer", "seed", "guidance_scale", "guidance_scale_2", "s_ssm_weight", "t_ssm_weight", "mask_scope",
                 "t_schedule", "lr_schedule", "momentum", "window", "window_overlap", "stop", "extend_max",
                 "extend_on", "extend_tol", "soft_mask")


@dataclass
class EditRequest:
    input: str
    source_prompt: str
    target_prompt: str
    out: str | None = None
    model: str | None = None
    cascade: str | None = None
    mask: str | None = None  # a file, "auto" or "none"; None: the default (auto) unless boxes are given
    boxes: str | None = None
    # the edit's settings (None: the preset's)
    preset: str | None = None
    steps: int | str | None = None  # an integer, or "auto": stop when converged (max_steps the cap)
    max_steps: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None  # a two-expert model's low-noise expert (Wan 2.2 A14B)
    s_ssm_weight: float | None = None
    t_ssm_weight: float | None = None
    layers: str | None = None  # comma-separated glob patterns
    mask_scope: str | None = None
    soft_mask: float | None = None  # an automatic mask graded by its cross-attention map (0: binary)
    t_schedule: str | None = None
    lr_schedule: str | None = None
    momentum: float | None = None
    window: int | None = None  # long clips: working frames the model sees at once (None: the model's own length)
    window_overlap: float | None = None
    stop: str | None = None  # "steps", "converged" (what steps=auto sets) or "extend" (continue unfinished edits)
    extend_max: int | None = None  # stop="extend": continuation segments at most
    extend_on: str | None = None  # stop="extend": the signal the rule reads ("speed" or "vdds")
    extend_tol: float | None = None  # stop="extend": continue while that signal is at least this times the segment before's
    settings: dict = field(default_factory=dict)  # any other EditConfig field by name
    # what is read and how it runs
    frames: int | None = None
    stride: int = 1
    start: float | None = None  # seconds into the input: the part of a long clip to edit
    end: float | None = None
    size: tuple[int, int] | str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    plan: str | None = None
    memory_budget: str | None = None
    compile_grad: bool = False
    attention: str = "sdpa"
    backend: str = "eager"
    # outputs
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: str | None = None
    report: str | None = None
    no_compare: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    quiet: bool = True

    @classmethod
    def from_args(cls, args) -> "EditRequest":
        """From ``fastdm-edit``'s parsed flags (an ``argparse.Namespace``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def __post_init__(self):
        if isinstance(self.size, str):
            self.size = parse_size(self.size)
        if isinstance(self.input, os.PathLike):
            self.input = str(self.input)

    # -- checks before anything is read or loaded ---------------------------------------------------
    def paths(self) -> tuple[Path, Path, Path, Path, str | None]:
        """``(input, output video, comparison video, report, checkpoint folder or None)``."""
        inp = Path(self.input)
        out = Path(self.out) if self.out else Path(f"{inp.stem or 'video'}_edit.mp4")
        compare = out.with_name(f"{out.stem}_compare{out.suffix}")
        report_path = Path(self.report) if self.report else out.with_suffix(".json")
        ckpt_dir = self.checkpoint_dir or self.resume or (str(out.with_suffix(".ckpt")) if self.checkpoint_every else None)
        return inp, out, compare, report_path, ckpt_dir

    def config(self, model: str | None = None) -> EditConfig:
        """The edit's ``EditConfig`` (the preset, then every setting given), validated, and the plan's
        refusal of the backend / options."""
        values = {k: getattr(self, k) for k in CONFIG_FIELDS if getattr(self, k) is not None}
        values.update(self.settings)
        if self.layers:
            values["tap_layers"] = tuple(s.strip() for s in self.layers.split(",") if s.strip())
        if isinstance(values.get("tap_layers"), list):
            values["tap_layers"] = tuple(values["tap_layers"])
        steps = values.get("steps")
        if isinstance(steps, str):
            if steps != "auto":
                try:
                    values["steps"] = int(steps)
                except ValueError:
                    raise BadInput(f"`steps` must be a positive integer or auto, got {steps!r}", field="steps") from None
            else:
                if values.get("stop", "converged") != "converged":
                    raise BadInput(f"`steps=auto` stops a converged edit; it does not go with `stop={values['stop']}`", field="stop")
                values["stop"] = "converged"
                values.pop("steps")
                if self.max_steps is not None:
                    values["steps"] = self.max_steps
        elif self.max_steps is not None:
            raise BadInput("`max_steps` is the cap of `steps=auto`; give `steps=auto` with it", field="max_steps")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(EditConfig)})
        if unknown:
            raise BadInput(f"unknown setting(s) {', '.join(unknown)}; settings are EditConfig fields", field="settings")
        config, self.settings_source = model_config(model or self.model, self.preset, self.source_prompt, self.target_prompt,
                                                    values)
        for name, what in (("extend_max", "caps the segments"), ("extend_on", "is the signal"), ("extend_tol", "is the ratio")):
            if values.get(name) is not None and config.stop != "extend":  # (the model's fastdm.json may say extend)
                off = self.settings_source["stop"]
                raise BadInput(f"`{name}` {what} of `stop=extend`, and this edit runs `stop={config.stop}`"
                               + (f" ({off})" if "extend off" in off else "") + "; give `stop=extend` with it", field=name)
        need_keys = config.s_ssm_weight > 0 or config.t_ssm_weight > 0
        if self.plan is not None and self.plan not in PLANS:
            raise BadInput(f"unknown plan {self.plan!r}; choose one of {', '.join(PLANS)}", field="plan")
        reasons = PLANS[self.plan or "fast"].not_supported_reasons(backend=self.backend, compile_grad=self.compile_grad,
                                                                   need_keys=need_keys)
        if reasons:
            raise Unsupported("; ".join(reasons), field="backend")
        return config

    def mask_mode(self) -> str:
        """``file``, ``auto`` or ``none``."""
        from .automask import DEFAULT_MODE

        return self.mask if self.mask in ("auto", "none") else "file" if self.mask else "none" if self.boxes else DEFAULT_MODE

    def check_outputs(self, out: Path, compare: Path, report_path: Path, ckpt_dir: str | None, inputs: list,
                      mask_out: Path | None = None) -> None:
        """``checkpoint_every``, every output path (writable, none of ``inputs``), ``resume`` and the
        checkpoint folder, in that order."""
        from .io import check_output_path, check_report_path

        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise BadInput("`checkpoint_every` must be >= 0", field="checkpoint_every")
        check_output_path(out, inputs=inputs)
        if not self.no_compare:
            check_output_path(compare, inputs=inputs, what="comparison video", flag="`out` (or pass `no_compare`)")
        check_report_path(report_path, inputs=inputs)
        if mask_out is not None:
            check_output_path(mask_out, inputs=inputs, what="mask video", flag="`out`")
        if self.resume and not Path(self.resume).is_dir():
            raise BadInput(f"`resume={self.resume}`: no such checkpoint folder", field="resume")
        if ckpt_dir and Path(ckpt_dir).exists() and not Path(ckpt_dir).is_dir():
            raise BadInput(f"`checkpoint_dir='{ckpt_dir}'` is a file; give a folder (it is created if missing)",
                           field="checkpoint_dir")

    def probe_inputs(self, inp: Path, mask_file: str | None):
        """The input decoded one frame at a time and none kept (every check of a read made), the mask and boxes
        checked against it: ``(fps, frame indices, (width, height), mask or None, boxes or None)``. The frames are
        read later at the working size (:func:`run`; a cascade reads its keyframes)."""
        from .io.video import probe_frames

        seen = probe_frames(inp, frames=self.frames, stride=self.stride, with_total=self._need_total(mask_file),
                            start=self.start, end=self.end)
        indices, src_size = seen["indices"], seen["size"]
        return (seen["fps"], indices, src_size, *self._mask_and_boxes(mask_file, indices, src_size, seen.get("total")))

    def check_size_before_reading(self, inp: Path, size: tuple[int, int] | None = None) -> None:
        """Refuse, before any frame is decoded, an input whose kept frames at the working size (``size``, else
        ``self.size``, else the model folder's ``fastdm.json`` native size) need more memory than is free: from
        what the container says (its duration and frame rate)."""
        from .io.video import check_fits, check_span, kept_count, source_info

        check_span(self.start, self.end)
        size = size or self.size or _folder_native_size(self.model)
        info = source_info(inp) if size else None
        if info is None:
            return
        kept = kept_count(info["frames"], info["fps"], frames=self.frames, stride=self.stride, start=self.start, end=self.end)
        span = f" (of {info['frames']} at {info['fps']:g} fps" + (f", every {self.stride}th" if self.stride > 1 else "") + ")"
        check_fits(kept, size, what=f"input video '{inp}'", detail=span, space=_folder_space(self.model))

    def _need_total(self, mask_file: str | None) -> bool:
        return bool(self.boxes or mask_file)  # to check their frame count against the whole input

    def _mask_and_boxes(self, mask_file: str | None, indices, src_size, total):
        """The mask file and the boxes, read and checked against the input's frames."""
        from .io import read_boxes, read_mask

        mask_raw = read_mask(mask_file, indices=indices, src_size=src_size, total_frames=total) if mask_file else None
        boxes = read_boxes(self.boxes, src_size=src_size, total_frames=total) if self.boxes else None
        return mask_raw, boxes


def _folder_json(model: str | os.PathLike | None) -> tuple[Path, dict]:
    """A model folder (``~`` expanded) and its ``fastdm.json`` as a dict (empty when absent or not an object), read
    without loading the model; invalid JSON is a one-line error."""
    import json

    from .backbone import resolve_model

    root = Path(resolve_model(model)).expanduser()
    meta = root / "fastdm.json"
    if not meta.is_file():
        return root, {}
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastDMError(f"{meta} is not valid JSON ({e}); fix it or delete it") from None
    return root, info if isinstance(info, dict) else {}


def model_config(model: str | None, preset: str | None, source_prompt: str, target_prompt: str,
                 given: dict) -> tuple[EditConfig, dict[str, str]]:
    """:func:`~fastdm.driver.config.resolve_config` under the defaults ``model``'s folder carries (its fastdm.json,
    its family's fallback; none where the folder does not exist): the settings an edit of that model runs with,
    and where each came from."""
    from .backbone import resolve_model

    model_defaults, family_defaults, family = folder_defaults(model) \
        if Path(resolve_model(model)).expanduser().is_dir() else ({}, {}, "family")
    return resolve_config(preset, source_prompt, target_prompt, given, model_defaults=model_defaults,
                          family_defaults=family_defaults, family=family)


def folder_defaults(path: str | os.PathLike | None) -> tuple[dict, dict, str]:
    """The edit defaults a model folder carries, read without loading it: ``(fastdm.json's "defaults", the family's
    fallback, the family's name)``; empty where the folder says nothing (or is not a folder the loader knows: the
    load then says why)."""
    import json

    from .backbone.components import _registry
    from .driver.config import check_defaults

    root, info = _folder_json(path)
    model, family, name = {}, {}, "family"
    if "defaults" in info:
        model = check_defaults(info["defaults"], str(root / "fastdm.json"))
    try:
        index = json.loads((root / "model_index.json").read_text())
        cls = next(index[k][1] for k in ("unet", "transformer") if isinstance(index.get(k), list) and len(index[k]) == 2)
    except (OSError, ValueError, StopIteration, TypeError):
        return model, family, name
    for backbone in _registry():
        if backbone.denoiser_class == cls:
            family, name = dict(backbone.edit_defaults), f"family {backbone.family}"
    return model, family, name


def _folder_space(model: str | None) -> str:
    """``latent`` when the model folder has a ``vae/``, else ``pixel`` (without loading it)."""
    from .backbone import resolve_model

    return "latent" if (Path(resolve_model(model)).expanduser() / "vae").is_dir() else "pixel"


def _folder_native_size(model: str | None) -> tuple[int, int] | None:
    """The native size a model folder's ``fastdm.json`` gives (without loading the model), or None (the loader
    reports a broken file)."""
    try:
        size = _folder_json(model)[1].get("native_size")
        return (int(size[0]), int(size[1])) if size else None
    except (FastDMError, OSError, ValueError, TypeError, IndexError):
        return None


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"`size` must look like 576x320 (width x height), got {text!r}", field="size") from None
    return w, h


def run(request: EditRequest, *, pipe=None, on_step=None, tensor_inputs: tuple[str, ...] = ("losses",),
        check_only: bool = False):
    """One edit as ``request`` describes it: checks, read, edit (or cascade), atomic outputs.

    ``pipe`` is an already loaded pipeline (else ``request.model`` is loaded); ``on_step`` replaces the
    progress bar as the step-end callback (it receives ``tensor_inputs``); ``check_only`` stops after
    the checks made before the model loads (returns None). Returns the ``EditResult`` (its ``report`` is
    the JSON report written beside the output)."""
    if request.cascade:  # cascaded edit: fastdm/cascade
        from .cascade import run_cascade

        return run_cascade(request, pipe=pipe, on_step=on_step, tensor_inputs=tensor_inputs, check_only=check_only)
    from .backbone import default_model_path
    from .backbone.loader import check_model_folder
    from .driver import DreamMotionPipeline
    from .io import read_frames

    inp, out, compare, report_path, ckpt_dir = request.paths()
    config = request.config()  # (and the plan's refusals) before anything is read or loaded
    budget = _budget(request)
    mask_mode = request.mask_mode()
    mask_file = request.mask if mask_mode == "file" else None
    mask_out = out.with_name(f"{out.stem}_mask{out.suffix}") if mask_mode == "auto" else None
    request.check_outputs(out, compare, report_path, ckpt_dir, [inp, mask_file, request.boxes], mask_out)

    check_model_folder(request.model or default_model_path())
    request.check_size_before_reading(inp)

    t0 = time.perf_counter()
    # the input is decoded once here, frame by frame and none kept, and mask and boxes checked against it, before
    # the model loads; the frames are read after it, resized to the working size as they are decoded
    fps, indices, src_size, mask_raw, boxes = request.probe_inputs(inp, mask_file)
    if check_only:
        return None

    if pipe is None:
        quiet_libraries()
        pipe = DreamMotionPipeline.from_pretrained(request.model, request.device, request.dtype, allow_pickle=request.allow_pickle,
                                                   trust_remote_code=request.trust_remote_code, attention=request.attention,
                                                   release_text_encoder=True)
    frames, mask, _ = _working_frames(request, pipe, None, indices, src_size, mask_raw, boxes, mask_mode,
                                      read=lambda size: read_frames(inp, frames=request.frames, stride=request.stride,
                                                                    size=size, start=request.start, end=request.end)[0])
    load_s = time.perf_counter() - t0
    result = _edit(request, pipe, config, frames, mask, budget, ckpt_dir, on_step, tensor_inputs)
    report = result.report
    report["input"] = {"path": str(inp), "fps": fps, "source_size": list(src_size), "frame_indices": indices,
                       "mask": request.mask, "boxes": request.boxes}
    if mask_mode == "auto" and not request.quiet:
        am = report["auto_mask"]
        words = ", ".join(am["words"]["source"] + am["words"]["target"])
        print(f"auto mask: {am['fallback']}; editing without a mask" if am["fallback"] else
              f"auto mask from the words {words}: {am['area_fraction']:.0%} of the frame editable "
              f"({am['denoiser_calls']} extra model call(s), {am['seconds']:.1f} s)")
    report["timings"]["load_s"] = round(load_s, 4)
    report["settings_source"] = getattr(request, "settings_source", None)
    if ckpt_dir:
        report["checkpoint_dir"] = ckpt_dir
    written = write_outputs(result, frames, fps, out, None if request.no_compare else compare, report_path, mask_out)
    report["report_path"] = str(report_path)
    if not request.quiet:
        t = report["timings"]
        ev = report["evaluations"]
        stop = f", converged at step {report['stop']['stopped_at']}" if report["stop"]["converged"] else ""
        if "extension" in report["stop"]:
            stop = f", {report['stop']['extension']['segments_run']} continuation segment(s)"
        print(f"wrote {', '.join(written)} ({report['steps_run']} steps{stop}, {ev['forward']} forward + {ev['backward']} "
              f"backward model evaluations, {t['step_mean_s']} s/step, plan {report['plan']['name']}, engine {report['backend']}, "
              f"peak memory {report['peak_memory_bytes'] / 2**20:.0f} MiB)")
    return result


def _budget(request: EditRequest):
    if request.memory_budget is None:
        return None
    if request.plan is not None:
        raise BadInput("give `plan` or `memory_budget`, not both", field="memory_budget")
    from .driver.budget import parse_size as parse_bytes

    return parse_bytes(request.memory_budget)


def _working_frames(request: EditRequest, pipe, raw, indices, src_size, mask_raw, boxes, mask_mode, *, read=None):
    """The frames resized and centre-cropped to the working size (``size``, else the model's), the mask to
    edit with (the given one or the boxes' cropped alike, ``"auto"``, or None) and the crop. ``read(size)``,
    when given, decodes the frames at that size itself (``raw`` is then None)."""
    from .io import boxes_to_mask, crop_mask, plan_crop, resize_crop

    info = pipe.backbone.info
    size = request.size or info.native_size
    if size[0] % info.size_multiple or size[1] % info.size_multiple:
        raise BadInput(f"`size={size[0]}x{size[1]}`: width and height must be multiples of {info.size_multiple} for this model",
                       field="size")
    crop = plan_crop(src_size, size)
    if read is not None:  # the exact count of the probe, before the frames are read
        from .io.video import check_fits

        check_fits(len(indices), tuple(size), what="input video", space=info.space)
    frames = read(size) if read is not None else resize_crop(raw, crop)
    mask = "auto" if mask_mode == "auto" else None
    if mask_raw is not None:
        mask = crop_mask(mask_raw, crop)
    elif boxes is not None:
        mask = boxes_to_mask(boxes, indices=indices, src_size=src_size, crop=crop)
    return frames, mask, crop


def _edit(request: EditRequest, pipe, config, frames, mask, budget, ckpt_dir, on_step, tensor_inputs):
    with progress(config.steps, request.quiet or on_step is not None) as bar_step:
        return pipe(frames, config=config, mask=mask, callback_on_step_end=on_step or bar_step,
                    callback_on_step_end_tensor_inputs=tensor_inputs, checkpoint_dir=ckpt_dir,
                    checkpoint_every=request.checkpoint_every, resume=bool(request.resume),
                    plan=None if budget is not None else (request.plan or "fast"), backend=request.backend,
                    memory_budget=budget, compile_grad=request.compile_grad)


def edit_frames(request: EditRequest, raw, *, pipe, mask=None, boxes: str | None = None, on_step=None,
                tensor_inputs: tuple[str, ...] = ("losses",)):
    """One edit of frames held in memory (a ComfyUI IMAGE batch, a service's decoded clip): the checks
    :func:`run` makes of the settings, the crop to the working size, the mask, the edit. Nothing is
    read or written; ``request.input`` names the frames in messages.

    ``raw``: ``(F, H, W, 3)`` uint8 frames at their own size. ``mask``: ``(F, H, W)`` or ``(H, W)`` (one for
    every frame) with values in [0, 1], 1 = editable, at the frames' size; ``boxes``: the boxes JSON
    text (:func:`fastdm.io.masks.read_boxes`' format, in the frames' pixels); neither: ``request.mask``
    decides (``"auto"``, the default, or ``"none"``). Returns ``(result, working-size frames)``."""
    import numpy as np

    from .io.masks import check_boxes

    config = request.config()
    budget = _budget(request)
    raw = _checked_frames(request, raw)
    f, h, w = raw.shape[:3]
    if mask is not None and boxes:
        raise BadInput("give a mask or boxes, not both", field="boxes")
    mask_raw = boxes_data = None
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != (h, w) or m.shape[0] not in (1, f):
            raise BadInput(f"the mask is {'x'.join(map(str, m.shape))} (frames x height x width) but the frames are {f}x{h}x{w}; "
                           "give one mask per frame, or one for every frame, at the frames' size", field="mask")
        mask_raw = np.broadcast_to((m > 0.5).astype(np.uint8) * 255, (f, h, w))
        mode = "file"
    elif boxes:
        boxes_data = check_boxes(boxes, name="the boxes", src_size=(w, h), total_frames=f)
        mode = "none"
    else:
        mode = request.mask_mode()
        if mode == "file":
            raise BadInput("`mask` here is an array, \"auto\" or \"none\"; pass the array as mask=", field="mask")
    frames, working_mask, _ = _working_frames(request, pipe, raw, list(range(f)), (w, h), mask_raw, boxes_data, mode)
    result = _edit(request, pipe, config, frames, working_mask, budget, None, on_step, tensor_inputs)
    return result, frames


def _checked_frames(request: EditRequest, raw):
    import numpy as np

    raw = np.asarray(raw)
    if raw.ndim != 4 or raw.shape[-1] != 3 or raw.dtype != np.uint8 or raw.shape[0] < 1:
        raise BadInput(f"{request.input}: frames must be a (frames, height, width, 3) uint8 array, got {raw.dtype} {tuple(raw.shape)}",
                       field="input")
    return raw


def auto_mask_frames(request: EditRequest, raw, *, pipe):
    """The automatic mask alone (:mod:`fastdm.automask`) of frames held in memory, as the edit of ``request``
    would make it: ``(mask, report)``, the mask ``(F, H, W)`` float32 0/1 at the frames' own size (what the
    crop to the working size cut off is 0), or None with the report's ``fallback`` saying why."""
    from .io.masks import uncrop_mask

    config = request.config()
    raw = _checked_frames(request, raw)
    f, h, w = raw.shape[:3]
    frames, _, crop = _working_frames(request, pipe, raw, list(range(f)), (w, h), None, None, "none")
    run = pipe.prepare(frames, config=config, mask="auto")
    am = run.auto_mask
    return (None if am.mask is None else uncrop_mask(am.mask, crop)), am.report()


def _mask_frames(mask, like):
    """A (F, H, W) 0/1 mask as RGB frames, white = editable (all white when there is none: all editable)."""
    import numpy as np

    if mask is None:
        return np.full_like(like, 255)
    return np.repeat((np.asarray(mask) > 0.5).astype(np.uint8)[..., None] * 255, 3, axis=-1)


def write_outputs(result, frames, fps, out: Path, compare: Path | None, report_path: Path, mask_out: Path | None = None) -> list[str]:
    """The edit, the side-by-side comparison (input | mask | edit with an automatic mask), the mask
    video (automatic mask) and the JSON report, each written atomically."""
    import itertools

    from .io import side_by_side, write_video
    from .io.atomic import write_json_atomic

    write_video(out, result.frames, fps)
    written = [str(out)]
    n = len(result.frames)

    def mask_panel():  # made frame by frame as the writers take them
        return (_mask_frames(None if result.mask is None else result.mask[i:i + 1], frames[i:i + 1])[0] for i in range(n))

    if mask_out is not None:
        write_video(mask_out, mask_panel(), fps)
        written.append(str(mask_out))
    if compare is not None:  # input | mask | edit with an automatic mask, else input | edit; a row at a time
        masks = mask_panel() if mask_out is not None else itertools.repeat(None, n)
        rows = (side_by_side(frames[i:i + 1], *([] if m is None else [m[None]]), result.frames[i:i + 1])[0]
                for i, m in enumerate(masks))
        write_video(compare, rows, fps)
        written.append(str(compare))
    result.report["outputs"] = written
    write_json_atomic(report_path, result.report)
    return [*written, str(report_path)]


__all__ = ["EditRequest", "FastDMError", "auto_mask_frames", "edit_frames", "parse_size", "progress", "quiet_libraries", "run", "write_outputs"]
