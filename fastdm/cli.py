"""`fastdm-edit`: edit a video's appearance from a text prompt, keeping structure and motion.

Exit codes: 0 success, 2 bad usage or bad input (one-line error), 1 internal error.
"""

from __future__ import annotations

import argparse
import sys

from .backbone.loader import DTYPES
from .driver.config import (EXTEND_SIGNALS, LR_SCHEDULES, MASK_SCOPES, OPTIMIZERS, PRESETS, STOP_RULES, T_SCHEDULES, EditConfig,
                            config_from_preset)
from .driver.engines import ENGINES
from .driver.plan import PLANS
from .errors import FastDMError, flags_of, spell
from .version import __version__

_DEFAULTS = EditConfig("source", "target")  # one source of truth for the defaults the help shows
_PAPER = config_from_preset("paper", "source", "target")

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
    from .request import parse_size

    try:
        return parse_size(text)
    except FastDMError as e:
        raise argparse.ArgumentTypeError(spell(str(e), {"size": "--size"})) from None


def _steps(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be a positive integer or auto, got {text!r}") from None
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastdm-edit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="named settings: default (measured: benchmarks/cost.py) or paper (DreamMotion's: SGD, lr "
                        f"{_PAPER.lr:g}, t ~ U[{_PAPER.t_min}, {_PAPER.t_max}], {_PAPER.steps} steps); the flags below override it")
    p.add_argument("--steps", type=_steps, default=None,
                   help=f"optimization steps, or auto: stop when the edit has converged, at most --max-steps (default "
                        f"{_DEFAULTS.steps}, or the model's fastdm.json)")
    p.add_argument("--stop", choices=STOP_RULES, default=None,
                   help=f"steps: run --steps; converged: what --steps auto does; extend: after --steps, continue an unfinished "
                        f"edit segment by segment, at most --extend-max segments (default {_DEFAULTS.stop}, or the model's "
                        "fastdm.json)")
    p.add_argument("--extend-max", type=int, default=None, metavar="N",
                   help=f"--stop extend: continuation segments at most (default {_DEFAULTS.extend_max})")
    p.add_argument("--extend-on", choices=EXTEND_SIGNALS, default=None,
                   help="--stop extend: continue while this signal of the last segment is at least --extend-tol times the one "
                        f"before's: speed (the edit's movement per unit lr) or vdds (the masked V-DDS residual) (default {_DEFAULTS.extend_on}, "
                        "or the model's fastdm.json)")
    p.add_argument("--extend-tol", type=float, default=None,
                   help=f"--stop extend: the ratio that continues (default {_DEFAULTS.extend_tol:g}, or the model's fastdm.json)")
    p.add_argument("--max-steps", type=int, default=None, help="the cap of --steps auto (default: the preset's step count)")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {_DEFAULTS.lr:g})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"default {_DEFAULTS.optimizer}")
    p.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default {_DEFAULTS.momentum:g})")
    p.add_argument("--t-schedule", choices=T_SCHEDULES, default=None,
                   help=f"how t is drawn per step: uniform (paper), anneal (descending strata), stratified (default "
                        f"{_DEFAULTS.t_schedule})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None, help=f"default {_DEFAULTS.lr_schedule}")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="long clips: edit in windows of N working frames (Wan: latent frames) on one shared video; default: "
                        "the model's own length (fastdm.json 'frames', else 24 for UNet3D, 21 latent = 81 frames for Wan)")
    p.add_argument("--window-overlap", type=float, default=None,
                   help=f"share of a window its neighbour overlaps (default {_DEFAULTS.window_overlap:g})")
    p.add_argument("--seed", type=int, default=None, help=f"default {_DEFAULTS.seed}")
    p.add_argument("--guidance-scale", type=float, default=None, help=f"default {_DEFAULTS.guidance_scale:g}")
    p.add_argument("--guidance-scale-2", type=float, default=None,
                   help="two-expert models (Wan 2.2 A14B): the low-noise expert's guidance (default: --guidance-scale)")
    p.add_argument("--s-ssm-weight", type=float, default=None,
                   help=f"S-SSM (structure) loss weight (default {_DEFAULTS.s_ssm_weight:g}); 0 turns it off")
    p.add_argument("--t-ssm-weight", type=float, default=None,
                   help=f"T-SSM (motion) loss weight (default {_DEFAULTS.t_ssm_weight:g}); 0 turns it off")
    p.add_argument("--layers", default=None, help="comma-separated glob patterns of self-attention layers to tap (default: decoder's coarsest attention level)")
    p.add_argument("--mask-scope", choices=MASK_SCOPES, default=None,
                   help="what --mask/--boxes limit: the whole update (default: nothing outside changes) or only V-DDS")
    p.add_argument("--soft-mask", type=float, default=None, metavar="POWER",
                   help="an automatic mask graded by its cross-attention map: the update inside it weighted by "
                        f"min(1, map / threshold) ** POWER; 0 keeps it binary (default {_DEFAULTS.soft_mask:g}, or the model's fastdm.json)")
    p.add_argument("--frames", type=int, default=None, help="use at most N frames")
    p.add_argument("--stride", type=int, default=1, help="use every K-th frame")
    p.add_argument("--start", type=float, default=None, metavar="SECONDS", help="edit from this time in the input (default: its start)")
    p.add_argument("--end", type=float, default=None, metavar="SECONDS", help="edit up to this time (default: the input's end)")
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


def run(args: argparse.Namespace) -> int:
    """``fastdm-edit``'s flags as an :class:`~fastdm.request.EditRequest`, run by :func:`fastdm.request.run`."""
    from .request import EditRequest
    from .request import run as run_request

    run_request(EditRequest.from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = bool(args.quiet)
    try:
        return run(args)
    except FastDMError as e:  # the API's parameter names, spelled as this command's flags
        print(f"fastdm-edit: error: {spell(str(e), flags_of(parser))}", file=sys.stderr)
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
