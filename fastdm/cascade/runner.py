"""Run a cascade: check every stage, then run them one at a time (load, use, release).

``fastdm-edit INPUT --cascade FILE ...`` comes here from :func:`fastdm.request.run`. Order of work:

1. Every check that needs no weights: the cascade file, each stage's folder and classes
   (:func:`fastdm.cascade.folders.check_stage_folder`), the input, mask/boxes, output paths, the
   checkpoint folder. Any failure is one line before anything is loaded or written.
2. The stages in order. Each stage's model is loaded, used and released (``del``, ``gc.collect()``,
   ``torch.cuda.empty_cache()`` on CUDA; the report says whether the weights were really freed), so
   the peak is the largest stage's, not the sum. Per stage the report gives the seconds, the peak
   memory during the stage (CUDA max allocated, or the process's peak RSS since the stage began),
   frames and size in and out.
3. With a checkpoint folder (``--checkpoint-every N`` or ``--resume DIR``): the edit checkpoints
   into ``DIR/edit/`` every N steps (exact resume, as without a cascade) and every finished stage's
   frames are written atomically to ``DIR/stage-I-KIND.npy`` (uint8, read back with
   ``allow_pickle=False``) and listed in ``DIR/cascade.json``; ``--resume DIR`` skips the stages
   listed there. A checkpoint made with another cascade, input or options is refused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from ..errors import FastDMError
from ..io.atomic import atomic_output, write_json_atomic
from .folders import check_stage_folder, load_stage_model
from .spec import Cascade, load_cascade
from .stages import keyframe_positions, output_fps, run_interpolate, run_refine, run_upscale, source_positions_at_output_times

CKPT_FORMAT = "fastdm-cascade-checkpoint/1"
SHAPES_UPSCALE_HINT = ("the shapes upscale model is not bundled yet ({path} is missing); it is trained by "
                       "python tools/train_shapes_upscale.py, or give `cascade` a cascade file")


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dead(refs) -> bool:
    gc.collect()
    return all(r() is None for r in refs)


def check_cascade(cascade: Cascade, args) -> dict:
    """All stage-folder checks (no weights loaded); returns ``{stage index: FolderInfo or None}``."""
    from ..backbone import default_model_path
    from ..backbone.loader import check_model_folder

    infos = {}
    for st in cascade.stages:
        label = f"`cascade={cascade.source}`: {st.label}"
        if st.kind == "edit":
            if st.model and args.model:
                raise FastDMError(f"{label} names its model and `model` names another; give one of them")
            path = st.model or args.model or default_model_path()
            st.model = str(path)
            if not Path(path).expanduser().is_dir() or not (Path(path).expanduser() / "transformer").is_dir():
                info = check_stage_folder(path, "edit", label, trust_remote_code=args.trust_remote_code,
                                          allow_pickle=args.allow_pickle)
                if not info.showone:
                    check_model_folder(path)
                infos[st.index] = info
            else:  # a Wan folder: the fastdm loader's own checks
                check_model_folder(path)
                infos[st.index] = None
            if st.settings.get("size") and args.size:
                raise FastDMError(f"{label} sets 'size' and `size` another; give one of them")
            continue
        if cascade.builtin == "shapes" and not Path(st.model).is_dir():
            raise FastDMError(f"`cascade=shapes`: {SHAPES_UPSCALE_HINT.format(path=os.path.relpath(st.model))}")
        infos[st.index] = check_stage_folder(st.model, st.kind, label, trust_remote_code=args.trust_remote_code,
                                             allow_pickle=args.allow_pickle)
    return infos


class _StageStore:
    """Finished stages' frames in the checkpoint folder (atomic .npy files + cascade.json)."""

    def __init__(self, folder: str | None, fingerprint: str, resume: bool):
        self.folder = Path(folder) if folder else None
        self.fingerprint = fingerprint
        self.entries: dict[int, dict] = {}
        if resume:
            meta_path = self.folder / "cascade.json"
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise FastDMError(f"`resume={folder}`: cascade.json is unreadable; delete the folder and start again") from None
                if meta.get("format") != CKPT_FORMAT:
                    raise FastDMError(f"`resume={folder}`: cascade.json is not a {CKPT_FORMAT} file")
                if meta.get("fingerprint") != fingerprint:
                    raise FastDMError(f"`resume={folder}`: the checkpoint was made with another cascade, input or options; "
                                      "resume with the same command or start a new edit")
                self.entries = {int(e["index"]): e for e in meta.get("stages", [])}
            elif not (self.folder / "edit").is_dir():
                raise FastDMError(f"`resume={folder}`: no cascade checkpoint there (cascade.json and edit/ missing); "
                                  "run with `checkpoint_every=N` first")

    def load(self, index: int) -> tuple[np.ndarray, dict] | None:
        e = self.entries.get(index)
        if e is None:
            return None
        path = self.folder / e["file"]
        try:
            frames = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # missing or damaged: the stage runs again
        if frames.dtype != np.uint8 or frames.ndim != 4 or list(frames.shape) != e["shape"]:
            return None
        return frames, e

    def save(self, index: int, kind: str, frames: np.ndarray, record: dict) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"stage-{index}-{kind}.npy"
        with atomic_output(self.folder / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(frames), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        self.entries[index] = {"index": index, "kind": kind, "file": name, "shape": list(frames.shape), "record": record}
        write_json_atomic(self.folder / "cascade.json", {"format": CKPT_FORMAT, "fingerprint": self.fingerprint,
                                                         "stages": [self.entries[i] for i in sorted(self.entries)]})


def run_cascade(args, *, pipe=None, on_step=None, tensor_inputs=("losses",), check_only: bool = False):
    """``fastdm-edit INPUT --cascade FILE``: see the module docstring. ``args`` is the
    :class:`~fastdm.request.EditRequest`; returns the :class:`~fastdm.driver.pipeline.EditResult` of the
    whole cascade (the final frames and the report written beside them), None with ``check_only``."""
    from ..driver.pipeline import EditResult, _PeakMemory
    from ..driver.progress import quiet_libraries
    from ..io import read_frames, side_by_side, write_video

    t_start = time.perf_counter()
    cascade = load_cascade(args.cascade)
    inp, out, compare, report_path, ckpt_dir = args.paths()
    config = args.config()
    if args.memory_budget is not None:
        raise FastDMError("`memory_budget` is not available with `cascade`; pick the edit stage's `plan`")
    mask_file = args.mask if args.mask not in (None, "auto", "none") else None
    # the mask as given, or the default mode's name where neither --mask nor --boxes is (the fingerprint and the report)
    mask_given = args.mask if (args.mask or args.boxes) else args.mask_mode()
    args.check_outputs(out, compare, report_path, ckpt_dir, [inp, mask_file, args.boxes, args.cascade])
    infos = check_cascade(cascade, args)
    edit = cascade.stages[0]
    config = args.config(model=edit.model)  # (again, with the edit stage's model: its folder's and family's defaults)

    # decoded frame by frame and none kept (checks, mask and boxes), then only the keyframes are read: a long or
    # large input never sits in memory whole
    fps, indices, src_size, mask_raw, boxes = args.probe_inputs(inp, mask_file)
    key_pos = keyframe_positions(len(indices), edit.settings.get("frames"))
    if check_only:
        return None

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastDMError("`device=cuda` was asked for but no CUDA GPU is available; use `device=cpu`")
    from ..backbone import parse_dtype

    dtype = parse_dtype(args.dtype)
    quiet_libraries()
    keys_raw, _, key_indices = read_frames(inp, frames=args.frames, stride=args.stride, start=args.start, end=args.end,
                                           pick=key_pos)
    fp = hashlib.sha256(json.dumps({"cascade": cascade.to_dict(), "config": config.fingerprint(), "plan": args.plan,
                                    "dtype": args.dtype, "device": device.type, "size": args.size,
                                    "mask": mask_given, "boxes": args.boxes}, sort_keys=True, default=str).encode())
    fp.update(np.ascontiguousarray(keys_raw).tobytes())
    if mask_raw is not None:
        fp.update(np.ascontiguousarray(mask_raw).tobytes())
    store = _StageStore(ckpt_dir, fp.hexdigest()[:16], bool(args.resume))
    load_s = time.perf_counter() - t_start

    records, frames, edit_report = [], None, None
    for st in cascade.stages:
        got = store.load(st.index)
        if got is not None:
            frames, e = got
            rec = dict(e["record"], skipped=True, seconds=0.0)
            records.append(rec)
            if st.kind == "edit":
                edit_report = rec.get("edit_report")
            if not args.quiet:
                print(f"{st.label}: done in an earlier run, skipped ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]})")
            continue
        memory = _PeakMemory(device)
        t0 = time.perf_counter()
        n_in = None if frames is None else list(frames.shape)
        refs = []
        extra = {}
        if st.kind == "edit":
            frames, edit_report, refs = _run_edit(st, infos[st.index], args, pipe, config, keys_raw, key_pos, key_indices,
                                                             src_size, mask_raw, boxes, ckpt_dir, on_step, tensor_inputs,
                                                             device, dtype)
            extra["edit_report"] = edit_report
        elif st.kind == "refine":
            from ..backbone import load_backbone

            bb = load_backbone(st.model, device, dtype, args.allow_pickle, args.trust_remote_code)
            refs = [weakref.ref(m) for m in bb.modules().values()]
            frames = run_refine(bb, frames, args.target_prompt, st.settings)
            del bb
        else:
            label = f"`cascade={cascade.source}`: {st.label}"
            model = load_stage_model(infos[st.index], label, device=device, dtype=dtype,
                                     trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
            refs = [weakref.ref(m) for m in model.modules()]
            fn = run_upscale if st.kind == "upscale" else run_interpolate
            frames = fn(model, frames, args.target_prompt, st.settings)
            del model
        _release(device)
        rec = {"index": st.index, "kind": st.kind, "model": st.model, "settings": st.settings,
               "frames_in": n_in[0] if n_in else len(key_pos), "size_in": [n_in[2], n_in[1]] if n_in else list(src_size),
               "frames_out": int(frames.shape[0]), "size_out": [int(frames.shape[2]), int(frames.shape[1])],
               "seconds": round(time.perf_counter() - t0, 4), "peak_memory_bytes": memory.read(),
               "peak_memory_kind": memory.kind, "model_released": _dead(refs) if refs else None, "skipped": False, **extra}
        memory.close()
        records.append(rec)
        store.save(st.index, st.kind, frames, rec)
        if not args.quiet:
            print(f"{st.label}: {rec['frames_out']} frames {rec['size_out'][0]}x{rec['size_out'][1]} in {rec['seconds']:.1f} s, "
                  f"peak memory {rec['peak_memory_bytes'] / 2**20:.0f} MiB")

    fps_out = output_fps(indices, fps, key_pos, frames.shape[0])
    write_video(out, frames, fps_out)
    written = [str(out)]
    if not args.no_compare:
        src = read_frames(inp, frames=args.frames, stride=args.stride, start=args.start, end=args.end,
                          pick=source_positions_at_output_times(indices, key_pos, frames.shape[0]),
                          size=(frames.shape[2], frames.shape[1]))[0]
        write_video(compare, side_by_side(src, frames), fps_out)
        written.append(str(compare))
    ran = [r for r in records if not r["skipped"]]
    report = {
        "cascade": {**cascade.to_dict(), "stages": records},
        "config": config.to_dict(),
        "input": {"path": str(inp), "fps": fps, "source_size": list(src_size), "frame_indices": indices,
                  "mask": mask_given, "boxes": args.boxes},
        "keyframes": {"positions": key_pos, "input_frame_indices": key_indices, "output_frames": int(frames.shape[0]),
                      "output_fps": fps_out, "output_size": [int(frames.shape[2]), int(frames.shape[1])]},
        "timings": {"load_s": round(load_s, 4), "stages_s": round(sum(r["seconds"] for r in records), 4),
                    "total_s": round(time.perf_counter() - t_start, 4)},
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in ran), default=None),
        "peak_memory_kind": ran[0]["peak_memory_kind"] if ran else None,
        "outputs": written,
    }
    if ckpt_dir:
        report["checkpoint_dir"] = ckpt_dir
    write_json_atomic(report_path, report)
    report["report_path"] = str(report_path)
    if not args.quiet:
        print(f"wrote {', '.join(written + [str(report_path)])} ({len(records)} stages, {frames.shape[0]} frames "
              f"{frames.shape[2]}x{frames.shape[1]} at {fps_out:.3g} fps, largest stage peak "
              f"{(report['peak_memory_bytes'] or 0) / 2**20:.0f} MiB)")
    return EditResult(frames, report)


def _run_edit(st, info, args, pipe, config, keys_raw, key_pos, key_indices, src_size, mask_raw, boxes, ckpt_dir, on_step,
              tensor_inputs, device, dtype):
    """The DreamMotion edit of the keyframes at the base stage's size; returns (frames, report, weakrefs)."""
    from ..driver import DreamMotionPipeline
    from ..driver.progress import progress
    from ..io import boxes_to_mask, crop_mask, plan_crop, resize_crop

    own = pipe is None or str(Path(pipe.backbone.info.path).resolve()) != str(Path(st.model).expanduser().resolve())
    if own:
        if info is not None and info.showone:
            from .folders import load_stage_model
            from .stages import showone_edit_backbone

            model = load_stage_model(info, f"`cascade`: {st.label}", device=device, dtype=dtype,
                                     trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
            bb = showone_edit_backbone(model, str(info.path), st.settings.get("size"))
            del model
            bb.set_attention(args.attention)
            pipe = DreamMotionPipeline(bb, release_text_encoder=True)
        else:
            pipe = DreamMotionPipeline.from_pretrained(st.model, args.device, args.dtype, allow_pickle=args.allow_pickle,
                                                       trust_remote_code=args.trust_remote_code, attention=args.attention,
                                                       release_text_encoder=True)
    bb = pipe.backbone
    size = tuple(st.settings.get("size") or args.size or bb.info.native_size)
    if size[0] % bb.info.size_multiple or size[1] % bb.info.size_multiple:
        raise FastDMError(f"the edit stage's size {size[0]}x{size[1]}: width and height must be multiples of "
                          f"{bb.info.size_multiple} for its model")
    crop = plan_crop(src_size, size)
    frames = resize_crop(keys_raw, crop)
    mask = "auto" if args.mask_mode() == "auto" else None  # (no --mask and no --boxes: the default mode, as fastdm-edit)
    if mask_raw is not None:  # read for the selected input frames; the keyframes' rows, through the same crop
        mask = crop_mask(mask_raw[key_pos], crop)
    elif boxes is not None:
        mask = boxes_to_mask(boxes, indices=key_indices, src_size=src_size, crop=crop)
    edit_dir = str(Path(ckpt_dir) / "edit") if ckpt_dir else None
    resume = bool(args.resume) and edit_dir is not None and (Path(edit_dir) / "state.pt").is_file()
    with progress(config.steps, args.quiet or on_step is not None) as bar_step:
        result = pipe(frames, config=config, mask=mask, callback_on_step_end=on_step or bar_step,
                      callback_on_step_end_tensor_inputs=tensor_inputs, checkpoint_dir=edit_dir,
                      checkpoint_every=args.checkpoint_every, resume=resume, plan=args.plan or "fast",
                      backend=args.backend, compile_grad=args.compile_grad)
    refs = [weakref.ref(m) for m in bb.modules().values()] if own else []
    out = result.frames
    report = result.report
    del result, bb
    if own:
        del pipe
    return out, report, refs
