"""`fastdm-app`: a Gradio web app over one loaded pipeline.

Upload a clip (or pick a bundled one), type the source and target prompts, optionally limit the
edit with boxes (the CLI's ``--boxes`` JSON, typed) or a mask upload, set steps / lr / guidance /
seed / plan, and press Run: the status line follows every step (step, t, losses), a preview strip
of the edited frames comes every few steps, Stop ends the edit after the current step (the
result then covers the steps run). The input | edit video and downloads of the edit, the
comparison and the JSON report follow.

Each Run goes through :func:`fastdm.request.run` with the app's pipeline, so inputs are checked and
refused with exactly ``fastdm-edit``'s one-line messages. One edit runs at a time per loaded
model: Run is queued with concurrency 1 (the others wait in Gradio's queue), and an edit whose
tab was closed is told to stop and holds the model until its current step ends.
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput, FastDMError, MissingDependency, flags_of, spell
from ..io.video import enlarge as _enlarge
from ..io.video import preview_strip
from ..request import EditRequest, model_config
from ..version import __version__
from .jobs import edit_request

PROG = "fastdm-app"
INSTALL_HINT = "pip install 'fastdm[app]'"
CLIPS = Path(__file__).resolve().parent.parent / "assets" / "clips"
NO_CLIP = "(none: use the upload)"
BOXES_HINT = '{"0": [14, 7, 31, 23], "7": [0, 7, 17, 23]}'
# request parameters -> the labels of the form's fields (what an error names)
FORM_FIELDS = {"input": "Upload a clip", "source_prompt": "Source prompt", "target_prompt": "Target prompt", "boxes": "Boxes",
               "mask": "Mask upload", "preset": "Preset", "steps": "Steps", "lr": "Learning rate",
               "guidance_scale": "Guidance scale", "seed": "Seed", "plan": "Plan", "frames": "Frames"}
VIEW_HEIGHT = 192  # the side-by-side player's video is enlarged (nearest) to at least this height


def bundled_clips() -> list[str]:
    return sorted(p.name for p in CLIPS.iterdir() if p.suffix.lower() in (".gif", ".mp4", ".webm"))


def _require_gradio():
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports sent from an offline tool
    try:
        import gradio
    except ImportError:
        raise MissingDependency(f"Gradio is not installed; install it with: {INSTALL_HINT}") from None
    return gradio


@dataclass
class Limits:
    """What one upload may be, checked before any work (the defaults suit a page shared on a small server)."""

    upload_mb: float = 200.0
    frames: int = 300
    seconds: float = 60.0
    pixels: int = 1920 * 1080  # width x height of a frame

    def check(self, path: Path, frames: int | None = None) -> None:
        """Refuse an upload over a limit, with the arithmetic, reading at most ``frames + 1`` frames (one at a
        time, nothing kept); ``frames`` is the form's frame cap (what is read of a longer clip)."""
        from ..io.video import probe_frames

        mb = path.stat().st_size / 2**20
        if mb > self.upload_mb:
            raise BadInput(f"the upload is {mb:.1f} MB, more than this server's {self.upload_mb:g} MB; send a shorter or smaller clip",
                           field="input")
        cap = min(frames or self.frames, self.frames)
        seen = probe_frames(path, frames=cap + 1, what="upload")
        w, h = seen["size"]
        if w * h > self.pixels:
            raise BadInput(f"the upload is {w}x{h} ({w * h:,} pixels a frame), more than this server's {self.pixels:,}; "
                           "scale it down first", field="input")
        n = len(seen["indices"])
        if n > cap and not frames:
            raise BadInput(f"the upload has more than {self.frames} frames, this server's limit; cut it or set `frames` "
                           f"to {self.frames} or fewer", field="input")
        if frames and frames > self.frames:
            raise BadInput(f"`frames={frames}` is above this server's limit of {self.frames}", field="frames")
        used = min(n, cap)
        if used / seen["fps"] > self.seconds:
            raise BadInput(f"{used} frames at {seen['fps']:g} fps are {used / seen['fps']:.1f} s, more than this server's "
                           f"{self.seconds:g} s; cut the clip or set `frames`", field="input")


def read_auth(path: str | None) -> list[tuple[str, str]] | None:
    """Users and passwords, ``user:password`` a line, from the file ``path`` or else the environment variable
    ``FASTDM_APP_AUTH`` (pairs separated by commas); never from the command line. None: no login."""
    import os

    if path is not None and not Path(path).is_file():
        raise FastDMError(f"--auth file '{path}' does not exist; write user:password lines into it")
    text = Path(path).read_text() if path else os.environ.get("FASTDM_APP_AUTH", "")
    pairs = [p.strip() for p in text.replace(",", "\n").splitlines() if p.strip() and not p.strip().startswith("#")]
    if path is not None and not pairs:
        raise FastDMError(f"--auth file '{path}' holds no user:password line")
    out = []
    for p in pairs:
        user, sep, password = p.partition(":")
        if not sep or not user or not password:
            raise FastDMError("each login must be user:password (in --auth's file or FASTDM_APP_AUTH)")
        out.append((user, password))
    return out or None


class EditService:
    """The app's state: one pipeline, one edit at a time, a stop flag per browser session."""

    def __init__(self, pipe, *, model: str | None, device: str = "cpu", dtype: str = "fp32", out_root: str | Path,
                 preview_every: int = 5, max_steps: int | None = None, limits: "Limits | None" = None):
        self.pipe, self.model, self.device, self.dtype = pipe, model, device, dtype
        self.out_root = Path(out_root)
        self.preview_every, self.max_steps = max(1, preview_every), max_steps
        self.limits = limits or Limits()
        self.lock = threading.Lock()  # one edit at a time, also past a closed tab's cancelled generator
        self.stops: dict[str, threading.Event] = {}

    # -- a request -> the CLI's Namespace -----------------------------------------------------------
    def _args(self, run_dir: Path, upload, bundled, source, target, boxes_text, mask_file, steps, lr, guidance, seed,
              plan, frames, mask_mode=None, preset=None) -> tuple[EditRequest, dict[str, str]]:
        """The request of this form and the names to show for paths the user never typed."""
        names = {str(run_dir): "the app's output folder"}
        if upload:
            inp = str(upload)
            names[inp] = Path(inp).name
            self.limits.check(Path(inp), frames=int(frames) if frames else None)
        elif bundled and bundled != NO_CLIP:
            if bundled not in bundled_clips():
                raise FastDMError(f"no bundled clip {bundled!r}; choose one of {', '.join(bundled_clips())}")
            inp = str(CLIPS / bundled)
            names[inp] = bundled
        else:
            raise FastDMError("no input video: upload a clip or pick a bundled one")
        boxes = None
        if boxes_text and boxes_text.strip():
            boxes = run_dir / "boxes.json"
            boxes.write_text(boxes_text)
            names[f"'{boxes}'"] = "(typed in the app)"
            boxes = str(boxes)
        mask = None
        if mask_file:
            mask = str(mask_file)
            names[mask] = Path(mask).name
        if mask_mode and not (mask or boxes):  # without boxes or an upload: fastdm-edit --mask auto|none
            if mask_mode not in ("auto", "none"):
                raise FastDMError(f"mask mode {mask_mode!r}: choose auto or none")
            mask = mask_mode
        for name, v in (("steps", steps), ("lr", lr), ("guidance_scale", guidance), ("seed", seed)):
            if v is None:
                raise BadInput(f"`{name}` is empty; give a number", field=name)
        if steps != int(steps):
            raise BadInput(f"`steps` must be a positive integer, got {steps}", field="steps")
        if seed != int(seed):
            raise BadInput(f"`seed` must be an integer, got {seed}", field="seed")
        stem = Path(inp).stem or "video"
        request = edit_request(inp, source or "", target or "", out=run_dir / f"{stem}_edit.mp4", model=self.model,
                               device=self.device, dtype=self.dtype, mask=mask, boxes=boxes,
                               frames=int(frames) if frames else None, plan=plan or None, steps=int(steps), lr=float(lr),
                               guidance_scale=float(guidance), seed=int(seed), preset=preset or None)
        cap = request.config().cap  # (the model's continuation segments count: fastdm.json may say stop=extend)
        if self.max_steps and cap > self.max_steps:
            more = f" ({cap} with the model's continuation segments)" if cap > steps else ""
            raise BadInput(f"`steps={int(steps)}`{more} is above this server's limit of {self.max_steps}; lower it", field="steps")
        return request, names

    @staticmethod
    def _friendly(msg: str, names: dict[str, str]) -> str:
        msg = spell(msg, FORM_FIELDS)  # parameters as the form's labels
        for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
            msg = msg.replace(path, name)
        return msg

    def _preview(self, x) -> np.ndarray:
        from ..io.tensors import tensor_to_frames

        with self.pipe.lock:
            frames = tensor_to_frames(self.pipe.backbone.from_working(x))
        return preview_strip(frames)

    # -- Run ----------------------------------------------------------------------------------------
    def edit(self, session: str, *inputs):
        """Generator of (status, preview, input|edit video, downloads) updates for one Run."""
        import gradio as gr

        from ..io import write_video
        from ..request import run

        keep = gr.update()
        self.out_root.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="edit-", dir=self.out_root))
        try:
            args, names = self._args(run_dir, *inputs)
        except FastDMError as e:
            yield f"error: {self._friendly(str(e), {str(run_dir): 'the output folder'})}", keep, None, None
            return
        stop = threading.Event()
        self.stops[session] = stop
        updates: queue.Queue = queue.Queue()
        config = args.config()
        total = config.steps  # (an unfinished edit on a model whose fastdm.json says stop=extend goes on, up to config.cap)

        def progress_of(step: int) -> str:
            return f"step {step}/{total}" if step <= total else f"step {step}/{config.cap} (continuing an unfinished edit)"

        def on_step(_pipe, step, t, tensors):
            losses = {k: float(v) for k, v in tensors["losses"].items()}
            img = self._preview(tensors["x"]) if step % self.preview_every == 0 or step == total else None
            updates.put(("step", step, t, losses, img))
            return {"stop": True} if stop.is_set() else None

        def work():
            with self.lock:
                if stop.is_set():  # (its tab went away while it waited)
                    updates.put(("error", "stopped before it started"))
                    return
                try:
                    run(args, pipe=self.pipe, on_step=on_step, tensor_inputs=("losses", "x"))  # args: the EditRequest
                    updates.put(("done",))
                except FastDMError as e:
                    updates.put(("error", self._friendly(str(e), names)))
                except Exception as e:  # noqa: BLE001 - an internal error: one line, as the CLI prints it
                    updates.put(("error", f"internal error: {type(e).__name__}: {e}".replace("\n", " ")))

        thread = threading.Thread(target=work, name="fastdm-app-edit", daemon=True)
        waiting = self.lock.locked()
        thread.start()
        yield ("waiting for the edit before this one to finish" if waiting else "starting"), None, None, None
        last_step = 0
        try:
            while True:
                msg = updates.get()
                latest_img = None
                while msg[0] == "step" and not updates.empty():  # steps faster than the page: show the latest
                    latest_img = msg[4] if msg[4] is not None else latest_img
                    msg = updates.get()
                if msg[0] == "step":
                    _, last_step, t, losses, img = msg
                    img = img if img is not None else latest_img
                    text = f"{progress_of(last_step)}, t={t}: " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
                    if stop.is_set():
                        text += " (stopping after this step)"
                    yield text, (img if img is not None else keep), keep, keep
                elif msg[0] == "error":
                    yield f"error: {msg[1]}", keep, None, None
                    return
                else:
                    out = Path(args.out)
                    report_path = out.with_suffix(".json")
                    report = json.loads(report_path.read_text())
                    import imageio.v3 as iio

                    src = iio.imread(out.with_name(f"{out.stem}_compare{out.suffix}"), plugin="FFMPEG")
                    view = run_dir / "input_edit_view.mp4"
                    write_video(view, _enlarge(src, VIEW_HEIGHT), report["input"]["fps"] or 8)
                    edited = iio.imread(out, plugin="FFMPEG")
                    ran = report["steps_run"]
                    how = f"stopped after {ran} of {total} steps" if report["stopped_early"] else f"done: {ran} steps"
                    t = report["timings"]
                    text = (f"{how}, {t['step_mean_s']} s/step, final losses "
                            + ", ".join(f"{k} {v:.4g}" for k, v in report["final_losses"].items()))
                    files = [str(out), str(out.with_name(f"{out.stem}_compare{out.suffix}")), str(report_path)]
                    if "auto_mask" in report:  # the mask video too, and how the mask was made
                        files.insert(2, str(out.with_name(f"{out.stem}_mask{out.suffix}")))
                        am = report["auto_mask"]
                        text += ("; automatic mask: " + (am["fallback"] + ", so no mask" if am["fallback"] else
                                 f"{am['area_fraction']:.0%} of the frame from the words "
                                 + ", ".join(am["words"]["source"] + am["words"]["target"])))
                    yield text, preview_strip(edited), str(view), files
                    return
        finally:
            stop.set()  # a closed tab cancels this generator: its edit stops after the current step
            if self.stops.get(session) is stop:
                del self.stops[session]

    def stop(self, session: str) -> None:
        ev = self.stops.get(session)
        if ev is not None:
            ev.set()


def form_defaults(model: str | None, preset: str | None = None):
    """The settings the form shows for ``model`` under ``preset`` (None: the default), as an edit resolves them."""
    return model_config(model, preset, "s", "t", {})[0]


def build_app(service: EditService, queue_size: int | None = None):
    import gradio as gr

    from ..automask import DEFAULT_MODE
    from ..driver.config import PRESETS
    from ..driver.plan import PLANS

    d = form_defaults(service.model)  # the form starts at this model's own defaults
    clips = bundled_clips()
    with gr.Blocks(title="fastdm: DreamMotion video editing") as demo:
        gr.Markdown("## fastdm: DreamMotion zero-shot video editing\nChange a clip's appearance from a text prompt; "
                    "its structure and motion stay. The bundled model knows only the shapes world "
                    "(`a {colour} {shape} moving {direction}`, 32x32).")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Upload a clip", elem_id="upload", file_types=[".mp4", ".webm", ".gif", ".png", ".jpg", ".jpeg"],
                                 type="filepath")
                bundled = gr.Dropdown([NO_CLIP, *clips], value=NO_CLIP, label="Bundled clip (used when nothing is uploaded)")
                source = gr.Textbox(label="Source prompt", placeholder="a red circle moving right")
                target = gr.Textbox(label="Target prompt", placeholder="a blue circle moving right")
                with gr.Accordion("Limit the edit (optional): boxes or a mask", open=False):
                    boxes = gr.Textbox(label="Boxes (JSON, input pixels)", lines=2, placeholder=BOXES_HINT,
                                       info='[[x0, y0, x1, y1], ...] one per frame or one for all, or {"frame": box} '
                                            "keyframes (interpolated), as fastdm-edit --boxes")
                    mask = gr.File(label="Mask upload (white = editable)", type="filepath",
                                   file_types=[".mp4", ".webm", ".gif", ".png", ".jpg", ".jpeg"])
                    auto_mask = gr.Radio(["auto", "none"], value=DEFAULT_MODE, elem_id="mask_mode",
                                         label="Without boxes or an upload: automatic mask (from the words that differ "
                                               "between the prompts) or none")
                preset = gr.Dropdown(list(PRESETS), value="default", label="Preset",
                                     info="default: fastdm's measured schedule; paper: DreamMotion's (SGD, 200 steps). "
                                          "Steps and learning rate below override it")
                with gr.Row():
                    steps = gr.Number(value=d.steps, precision=0, label="Steps", minimum=1)
                    lr = gr.Number(value=d.lr, label="Learning rate")
                    guidance = gr.Number(value=d.guidance_scale, label="Guidance scale")
                with gr.Row():
                    seed = gr.Number(value=d.seed, precision=0, label="Seed")
                    plan = gr.Dropdown(list(PLANS), value="fast", label="Plan")
                    frames = gr.Number(value=0, precision=0, label="Frames (0 = all)", minimum=0)
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
            with gr.Column():
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
                preview = gr.Image(label="Preview (edited frames)", type="numpy", interactive=False, format="png",
                                   elem_id="preview")
                video = gr.Video(label="Input | mask | edit (input | edit without a mask)", interactive=False, loop=True, autoplay=True, elem_id="result")
                files = gr.File(label="Downloads (edit, side by side, mask, JSON report)", file_count="multiple", interactive=False,
                                elem_id="downloads")

        def on_run(up, bu, so, ta, bx, ma, st, l, g, se, pl, fr, am, pr, request: gr.Request):
            yield from service.edit(request.session_hash, up, bu, so, ta, bx, ma, st, l, g, se, pl, fr, am, pr)

        def on_preset(name):  # (the model's own defaults under the preset, as the edit will resolve them)
            c = form_defaults(service.model, name)
            return gr.update(value=c.steps), gr.update(value=c.lr)

        def on_stop(request: gr.Request):
            service.stop(request.session_hash)

        for fn in (on_run, on_stop):  # (this module's annotations are strings Gradio cannot resolve in here)
            fn.__annotations__["request"] = gr.Request

        preset.change(on_preset, [preset], [steps, lr])
        run_btn.click(on_run, [upload, bundled, source, target, boxes, mask, steps, lr, guidance, seed, plan, frames, auto_mask,
                               preset],
                      [status, preview, video, files], concurrency_limit=1, concurrency_id="edit", show_progress="minimal")
        stop_btn.click(on_stop, None, None, concurrency_limit=None, show_progress="hidden")
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    return demo


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A web page for DreamMotion edits (Gradio), over one loaded model.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--model", default=None, help="local diffusers-format model folder, or a bundled model by name: shapes (the default, a UNet3D) or shapes-dit (a Wan transformer)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    from ..backbone.loader import DTYPES

    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out-dir", default=None, help="where each run's outputs go (default: a new temporary folder)")
    p.add_argument("--preview-every", type=int, default=5, metavar="N", help="a preview of the edited frames every N steps")
    p.add_argument("--max-steps", type=int, default=None, help="refuse edits with more steps (for a shared server)")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="refuse larger uploads (default 200)")
    p.add_argument("--max-frames", type=int, default=300, help="refuse uploads with more frames, unless Frames caps them (default 300)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="refuse edits of more video than this (default 60)")
    p.add_argument("--max-resolution", default="1920x1080", metavar="WxH",
                   help="refuse uploads with more pixels a frame than this (default 1920x1080)")
    p.add_argument("--queue-size", type=int, default=8, help="edits waiting at most; more are turned away (default 8)")
    p.add_argument("--auth", default=None, metavar="FILE",
                   help="require a login: user:password lines in FILE (or FASTDM_APP_AUTH=user:pass,... in the "
                        "environment); needed to serve on any host but 127.0.0.1")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _require_gradio()
        from ..backbone import default_model_path
        from ..backbone.loader import check_model_folder
        from ..driver import DreamMotionPipeline
        from ..driver.progress import quiet_libraries

        if not 0 < args.port < 65536:
            raise FastDMError(f"--port must be 1-65535, got {args.port}")
        from ..request import parse_size

        try:
            mw, mh = parse_size(args.max_resolution)
        except FastDMError:
            raise FastDMError(f"--max-resolution must look like 1920x1080, got {args.max_resolution!r}") from None
        for flag, v in (("--max-upload-mb", args.max_upload_mb), ("--max-frames", args.max_frames),
                        ("--max-seconds", args.max_seconds), ("--queue-size", args.queue_size)):
            if not v > 0:
                raise FastDMError(f"{flag} must be positive, got {v}")
        limits = Limits(args.max_upload_mb, args.max_frames, args.max_seconds, mw * mh)
        auth = read_auth(args.auth)
        if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            raise FastDMError(f"--host {args.host} serves other machines: give --auth FILE (user:password lines) or "
                              "FASTDM_APP_AUTH so the page asks for a login")
        check_model_folder(args.model or default_model_path())
        out_root = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="fastdm-app-"))
        if out_root.exists() and not out_root.is_dir():
            raise FastDMError(f"--out-dir '{out_root}' is a file; give a folder")
        out_root.mkdir(parents=True, exist_ok=True)
        quiet_libraries()
        pipe = DreamMotionPipeline.from_pretrained(args.model, args.device, args.dtype)
        service = EditService(pipe, model=args.model, device=args.device, dtype=args.dtype, out_root=out_root,
                              preview_every=args.preview_every, max_steps=args.max_steps, limits=limits)
        demo = build_app(service, queue_size=args.queue_size)
        try:
            demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out_root.resolve())], quiet=True,
                        prevent_thread_lock=True, footer_links=[], auth=auth, max_file_size=int(args.max_upload_mb * 2**20))
        except OSError as e:
            raise FastDMError(f"cannot listen on {args.host}:{args.port} ({e}); pass another --port") from None
        print(f"{PROG}: serving on http://{args.host}:{args.port} (outputs in {out_root}); Ctrl+C stops", flush=True)
        demo.block_thread()
    except FastDMError as e:  # the API's parameter names, spelled as this command's flags
        print(f"{PROG}: error: {spell(str(e), flags_of(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        if args.debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
