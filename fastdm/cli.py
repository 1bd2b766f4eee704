"""`fastdm-edit`: edit a video's appearance from a text prompt, keeping structure and motion.

Exit codes: 0 success, 2 bad usage or bad input (one-line error), 1 internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from .backbone.engines import ENGINES
from .backbone.loader import DTYPES
from .driver.config import MASK_SCOPES, OPTIMIZERS, EditConfig
from .driver.plan import PLANS
from .errors import FastDMError

_DEFAULTS = EditConfig("source", "target")  # one source of truth for the defaults the help shows

DESCRIPTION = """\
DreamMotion zero-shot video editing: optimizes the input video against a frozen text-to-video
diffusion model with V-DDS (appearance), S-SSM (structure) and T-SSM (motion).

Without --model, the model bundled with fastdm is used: a tiny (2.3 M-parameter) pixel-space
text-to-video model trained on CPU by tools/train_shapes.py on the "shapes" world only: one
object (red green blue yellow magenta cyan white; circle square triangle) moving left, right, up
or down on black, 32x32, prompts like "a red circle moving right". It knows nothing else.
--model shapes-dit selects the other bundled model: the same world on a small Wan 2.1
transformer (flow matching, trained by tools/train_shapes_dit.py).
Point --model at a local diffusers-format folder (e.g. a downloaded ZeroScope v2 576w, with
--size 576x320) for real videos; fastdm never downloads weights.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"fastdm-edit: error: {message} (see fastdm-edit --help)\n")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 576x320 (width x height), got {text!r}") from None
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastdm-edit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="input video (mp4, webm, gif), image, or folder of png/jpg frames")
    p.add_argument("--source-prompt", required=True, help="text describing the input video")
    p.add_argument("--target-prompt", required=True, help="text describing the edited video")
    p.add_argument("--model", default=None, help="local diffusers-format model folder, or a bundled model by name: shapes (the default, a UNet3D) or shapes-dit (a Wan transformer)")
    p.add_argument("--cascade", default=None, metavar="FILE", help="cascaded edit: a cascade JSON file (edit at the base "
                   "stage's size and keyframes, then interpolate / upscale / refine stages; see README) or a built-in "
                   "name: shapes")
    p.add_argument("--out", default=None, help="output video, .mp4 or .gif (default: INPUT_edit.mp4 in the current folder)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mask", default=None, help="mask video, frame folder or image of the input's size; a video/folder needs the "
                   "input's frame count, a single png/jpg applies to every frame; white = editable. 'auto': estimated from "
                   "the model's cross-attention to the words that differ between the prompts (written to OUT_mask); "
                   "'none': no mask (a file of that name: ./auto, ./none). Without --mask and --boxes: "
                   "auto (measured on the quality suite; see README)")
    m.add_argument("--boxes", default=None, help="JSON of per-frame [x0, y0, x1, y1] boxes in input pixels (keyframes are interpolated)")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help=f"optimization steps (default {_DEFAULTS.steps}, as the paper)")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help=f"learning rate (default {_DEFAULTS.lr:g}, SGD as the paper)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=_DEFAULTS.optimizer)
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--guidance-scale", type=float, default=_DEFAULTS.guidance_scale)
    p.add_argument("--s-ssm-weight", type=float, default=_DEFAULTS.s_ssm_weight,
                   help=f"S-SSM (structure) loss weight (default {_DEFAULTS.s_ssm_weight:g}); 0 turns it off")
    p.add_argument("--t-ssm-weight", type=float, default=_DEFAULTS.t_ssm_weight,
                   help=f"T-SSM (motion) loss weight (default {_DEFAULTS.t_ssm_weight:g}); 0 turns it off")
    p.add_argument("--layers", default=None, help="comma-separated glob patterns of self-attention layers to tap (default: decoder's coarsest attention level)")
    p.add_argument("--mask-scope", choices=MASK_SCOPES, default=_DEFAULTS.mask_scope,
                   help="what --mask/--boxes limit: the whole update (default: nothing outside changes) or only V-DDS")
    p.add_argument("--frames", type=int, default=None, help="use at most N frames")
    p.add_argument("--stride", type=int, default=1, help="use every K-th frame")
    p.add_argument("--size", type=_size, default=None, help="WxH to resize + centre-crop to (default: the model's native size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model weights' dtype (the edited video stays fp32)")
    p.add_argument("--plan", choices=tuple(PLANS), default=None,
                   help="execution plan: fast (default), fast-seq (no-grad calls one at a time), lean (least memory: "
                        "sequential no-grad calls, block checkpointing, VAE tiling), plain and naive (the baselines)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="e.g. 8G: probe one step of fast, fast-seq, lean and run the fastest that fits (not with --plan)")
    p.add_argument("--compile-grad", action="store_true",
                   help="also torch.compile the grad branch (forward to the last tapped layer and its backward)")
    p.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa",
                   help="attention implementation: PyTorch SDPA (default) or xformers (CUDA, optional extra)")
    p.add_argument("--backend", choices=tuple(ENGINES), default="eager",
                   help="engine of the no-grad UNet calls: eager PyTorch, torch.compile, torch.compile with CUDA graphs (CUDA), "
                        "onnxruntime, or TensorRT (CUDA; engine cached on disk)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="write a resumable checkpoint every N steps")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: OUT.ckpt)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the edit from the checkpoint in DIR")
    p.add_argument("--report", default=None, metavar="PATH", help="JSON report path (default: OUT.json)")
    p.add_argument("--no-compare", action="store_true", help="do not write the side-by-side OUT_compare video")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; they can run code when loaded")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code shipped in the model folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:
        pass


def request_paths(args: argparse.Namespace) -> tuple[Path, Path, Path, Path, str | None]:
    """``(input, output video, comparison video, report, checkpoint folder or None)`` of an edit."""
    inp = Path(args.input)
    out = Path(args.out) if args.out else Path(f"{inp.stem or 'video'}_edit.mp4")
    compare = out.with_name(f"{out.stem}_compare{out.suffix}")
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    ckpt_dir = args.checkpoint_dir or args.resume or (str(out.with_suffix(".ckpt")) if args.checkpoint_every else None)
    return inp, out, compare, report_path, ckpt_dir


def request_config(args: argparse.Namespace, config_overrides: dict | None = None) -> EditConfig:
    """The edit's ``EditConfig`` (``config_overrides`` set fields by name), validated, and the plan's
    refusal of the backend / options, before anything is read or loaded."""
    config = EditConfig(
        source_prompt=args.source_prompt, target_prompt=args.target_prompt, steps=args.steps, lr=args.lr,
        optimizer=args.optimizer, seed=args.seed, guidance_scale=args.guidance_scale,
        s_ssm_weight=args.s_ssm_weight, t_ssm_weight=args.t_ssm_weight, mask_scope=args.mask_scope,
        tap_layers=tuple(s.strip() for s in args.layers.split(",") if s.strip()) if args.layers else None,
    )
    if config_overrides:
        import dataclasses

        config = dataclasses.replace(config, **config_overrides)
    config.validate()
    need_keys = config.s_ssm_weight > 0 or config.t_ssm_weight > 0
    reasons = PLANS[args.plan or "fast"].not_supported_reasons(backend=args.backend, compile_grad=args.compile_grad,
                                                               need_keys=need_keys)
    if reasons:
        raise FastDMError("; ".join(reasons))
    return config


def check_request_outputs(args: argparse.Namespace, out: Path, compare: Path, report_path: Path, ckpt_dir: str | None,
                          inputs: list, mask_out: Path | None = None) -> None:
    """``--checkpoint-every``, every output path (writable, none of ``inputs``), ``--resume`` and the
    checkpoint folder, in that order (before any weights are loaded)."""
    from .io import check_output_path, check_report_path

    if args.checkpoint_every < 0:
        raise FastDMError("--checkpoint-every must be >= 0")
    check_output_path(out, inputs=inputs)
    if not args.no_compare:
        check_output_path(compare, inputs=inputs, what="comparison video", flag="--out (or pass --no-compare)")
    check_report_path(report_path, inputs=inputs)
    if mask_out is not None:
        check_output_path(mask_out, inputs=inputs, what="mask video", flag="--out")
    if args.resume and not Path(args.resume).is_dir():
        raise FastDMError(f"--resume {args.resume}: no such checkpoint folder")
    if ckpt_dir and Path(ckpt_dir).exists() and not Path(ckpt_dir).is_dir():
        raise FastDMError(f"--checkpoint-dir '{ckpt_dir}' is a file; give a folder (it is created if missing)")


def read_request_inputs(args: argparse.Namespace, inp: Path, mask_file: str | None):
    """The input's frames and, checked against them, the mask and boxes (cropped later, at the model's
    size): ``(raw (F, H, W, 3) uint8, fps, frame indices, (width, height), mask or None, boxes or None)``."""
    from .io import read_boxes, read_frames, read_mask

    need_total = bool(args.boxes or mask_file)  # to check their frame count against the whole input
    raw, fps, indices, total = read_frames(inp, frames=args.frames, stride=args.stride, with_total=True) if need_total \
        else (*read_frames(inp, frames=args.frames, stride=args.stride), None)
    src_size = (raw.shape[2], raw.shape[1])
    mask_raw = read_mask(mask_file, indices=indices, src_size=src_size, total_frames=total) if mask_file else None
    boxes = read_boxes(args.boxes, src_size=src_size, total_frames=total) if args.boxes else None
    return raw, fps, indices, src_size, mask_raw, boxes


def run(args: argparse.Namespace, *, pipe=None, on_step=None, tensor_inputs: tuple[str, ...] = ("losses",),
        check_only: bool = False, config_overrides: dict | None = None) -> int:
    """One edit as the command line describes it. The other front ends (``fastdm-batch``, ``fastdm-app``)
    call this too, so every input check and one-line message is the CLI's: ``pipe`` is an already
    loaded pipeline (else ``args.model`` is loaded), ``on_step`` replaces the progress bar as the
    step-end callback (it receives ``tensor_inputs``), ``check_only`` stops after the checks made
    before the model loads, ``config_overrides`` sets ``EditConfig`` fields by name."""

    if getattr(args, "cascade", None):  # cascaded edit: fastdm/cascade (the other front ends never set it)
        from .cascade import run_cascade

        return run_cascade(args, pipe=pipe, on_step=on_step, tensor_inputs=tensor_inputs, check_only=check_only,
                           config_overrides=config_overrides)
    from .backbone import default_model_path
    from .driver import DreamMotionPipeline
    from .backbone.loader import check_model_folder
    from .io import boxes_to_mask, crop_mask, plan_crop, resize_crop

    inp, out, compare, report_path, ckpt_dir = request_paths(args)
    config = request_config(args, config_overrides)  # (and the plan's refusals) before anything is read or loaded
    budget = None
    if args.memory_budget is not None:
        if args.plan is not None:
            raise FastDMError("give --plan or --memory-budget, not both")
        from .driver.budget import parse_size

        budget = parse_size(args.memory_budget)
    from .automask import DEFAULT_MODE

    mask_mode = args.mask if args.mask in ("auto", "none") else "file" if args.mask else "none" if args.boxes else DEFAULT_MODE
    mask_file = args.mask if mask_mode == "file" else None
    mask_out = out.with_name(f"{out.stem}_mask{out.suffix}") if mask_mode == "auto" else None
    check_request_outputs(args, out, compare, report_path, ckpt_dir, [inp, mask_file, args.boxes], mask_out)

    check_model_folder(args.model or default_model_path())

    t0 = time.perf_counter()
    # mask and boxes are checked here, before the model loads; the crop comes after (it needs the model's size)
    raw, fps, indices, src_size, mask_raw, boxes = read_request_inputs(args, inp, mask_file)
    if check_only:
        return 0

    if pipe is None:
        _quiet_libraries()
        pipe = DreamMotionPipeline.from_pretrained(args.model, args.device, args.dtype, allow_pickle=args.allow_pickle,
                                                   trust_remote_code=args.trust_remote_code, attention=args.attention,
                                                   release_text_encoder=True)
    info = pipe.backbone.info
    size = args.size or info.native_size
    if size[0] % info.size_multiple or size[1] % info.size_multiple:
        raise FastDMError(f"--size {size[0]}x{size[1]}: width and height must be multiples of {info.size_multiple} for this model")
    crop = plan_crop(src_size, size)
    frames = resize_crop(raw, crop)
    mask = "auto" if mask_mode == "auto" else None
    if mask_raw is not None:
        mask = crop_mask(mask_raw, crop)
    elif boxes is not None:
        mask = boxes_to_mask(boxes, indices=indices, src_size=src_size, crop=crop)
    load_s = time.perf_counter() - t0

    with _progress(config.steps, args.quiet or on_step is not None) as bar_step:
        result = pipe(frames, config=config, mask=mask, callback_on_step_end=on_step or bar_step,
                      callback_on_step_end_tensor_inputs=tensor_inputs, checkpoint_dir=ckpt_dir,
                      checkpoint_every=args.checkpoint_every, resume=bool(args.resume),
                      plan=None if budget is not None else (args.plan or "fast"), backend=args.backend,
                      memory_budget=budget, compile_grad=args.compile_grad)
    report = result.report
    report["input"] = {"path": str(inp), "fps": fps, "source_size": list(src_size), "frame_indices": indices,
                       "mask": args.mask, "boxes": args.boxes}
    if mask_mode == "auto" and not args.quiet:
        am = report["auto_mask"]
        words = ", ".join(am["words"]["source"] + am["words"]["target"])
        print(f"auto mask: {am['fallback']}; editing without a mask" if am["fallback"] else
              f"auto mask from the words {words}: {am['area_fraction']:.0%} of the frame editable "
              f"({am['denoiser_calls']} extra model call(s), {am['seconds']:.1f} s)")
    report["timings"]["load_s"] = round(load_s, 4)
    if ckpt_dir:
        report["checkpoint_dir"] = ckpt_dir
    written = _write_outputs(result, frames, fps, out, None if args.no_compare else compare, report_path, mask_out)
    if not args.quiet:
        t = report["timings"]
        print(f"wrote {', '.join(written)} ({report['steps_run']} steps, {t['step_mean_s']} s/step, "
              f"plan {report['plan']['name']}, engine {report['backend']}, peak memory {report['peak_memory_bytes'] / 2**20:.0f} MiB)")
    return 0


@contextlib.contextmanager
def _progress(total: int, quiet: bool):
    """A tqdm bar fed by the pipeline's step-end callback (reading the losses syncs: CLI only)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc="fastdm-edit", unit="step", dynamic_ncols=True)

    def on_step(_pipe, step, t, tensors):
        bar.n = step
        bar.set_postfix({k: f"{float(v):.3g}" for k, v in tensors["losses"].items()} | {"t": t}, refresh=True)

    try:
        yield on_step
    finally:
        bar.close()


def _mask_frames(mask, like):
    """A (F, H, W) 0/1 mask as RGB frames, white = editable (all white when there is none: all editable)."""
    import numpy as np

    if mask is None:
        return np.full_like(like, 255)
    return np.repeat((np.asarray(mask) > 0.5).astype(np.uint8)[..., None] * 255, 3, axis=-1)


def _write_outputs(result, frames, fps, out: Path, compare: Path | None, report_path: Path, mask_out: Path | None = None) -> list[str]:
    """The edit, the side-by-side comparison (input | mask | edit with an automatic mask), the mask
    video (automatic mask) and the JSON report, each written atomically."""
    from .io import side_by_side, write_video
    from .io.atomic import write_json_atomic

    write_video(out, result.frames, fps)
    written = [str(out)]
    mask_panel = None if mask_out is None else [_mask_frames(result.mask, frames)]
    if mask_out is not None:
        write_video(mask_out, mask_panel[0], fps)
        written.append(str(mask_out))
    if compare is not None:
        write_video(compare, side_by_side(frames, *(mask_panel or []), result.frames), fps)
        written.append(str(compare))
    result.report["outputs"] = written
    write_json_atomic(report_path, result.report)
    return [*written, str(report_path)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except FastDMError as e:
        print(f"fastdm-edit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdm-edit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: one line unless --debug
        if args.debug:
            raise
        print(f"fastdm-edit: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
