"""``DreamMotionPipeline``: one object a service holds, running edit after edit.

It owns the backbone, a bounded prompt-embedding cache and the engines (torch.compile, CUDA
graphs, onnxruntime, TensorRT), each built once per (engine, plan batch, input shape, dtype,
tapped layers) and reused by later calls. :meth:`DreamMotionPipeline.prepare` turns one request
into an :class:`EditRun`; :meth:`EditRun.step` is *the* step loop body (the CLI, ``fastdm-bench``,
the quality suite and ``loss_balance`` all run through it), :meth:`EditRun.finish` decodes and
reports. ``pipe(...)`` is prepare + steps + finish.

Per step (one t, one noise e, shared by both branches): noise x and the source x^ alike
(``Backbone.noise_coefficients``); the grad branch (target prompt) with its keys tapped; the three
no-grad evaluations with the source keys; V-DDS gradient + S-SSM/T-SSM backward; optimizer step;
pixel-space tensors clamped. t and e come from one CPU generator seeded by ``seed``, so a CPU run
is bit-for-bit reproducible and a checkpointed run resumes exactly.

Threading contract: one pipeline may be called from several threads. Every step, every prompt
encoding and every engine build runs under the pipeline's lock (``pipe.lock``, re-entrant), which
guards the state a step patches for its duration (block checkpointing swaps block ``forward``\\s,
taps hook modules, engines are shared). Each call keeps its own edited tensor, optimizer and
random generator, so concurrent calls interleave step by step and each gets exactly what it
would get alone; a ``memory_budget``'s probe steps run under the lock too. Process-wide state is
never written behind another call's back: the peak-memory counters (CUDA peak stats, the RSS
high-water mark) are reset only by a call that starts alone, and a call that overlaps another
reports ``peak_memory_kind`` ``..._shared``; output files get their mode without touching the
process umask (``fastdm.io.atomic``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..backbone import Backbone, load_backbone
from ..errors import BadInput, Diverged, FastDMError, ResumeMismatch
from ..io.tensors import frames_to_tensor, tensor_to_frames  # noqa: F401  (re-exported: the older import path)
from ..losses import VDDSConfig
from ..taps import resolve_layers
from .checkpoint import load_checkpoint, save_checkpoint
from .config import EditConfig
from .plan import FAST, PLANS, ExecutionPlan
from .schedule import ConvergenceRule, ExtensionRule, draw_timestep, extension_lr_factor, extension_timestep, lr_factor, strata_order
from .windows import coverage, window_starts, window_stride
from .step import DreamMotionStep

PROMPT_CACHE_SIZE = 32
CALLBACK_TENSORS = ("x", "x_src", "grad", "losses", "grad_parts", "seconds")  # what a step-end callback may ask for
FINITE_CHECK_EVERY = 10  # on CUDA the finiteness check syncs, so it runs every N steps (every step on CPU)


@dataclass(frozen=True)
class Timings:
    """Seconds of one edit's phases (the report's ``timings``); None where a phase did not run."""

    encode_prompts_s: float | None = None
    prepare_s: float | None = None
    engine_build_s: float | None = None
    step_mean_s: float | None = None
    step_median_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    load_s: float | None = None  # reading and cropping the input (request layer)
    auto_mask_s: float | None = None


@dataclass(frozen=True)
class Evaluations:
    """Denoiser work of one edit, counted where it was done: forward batch elements (all of them, the
    automatic mask's and budget probes' ``setup_forward`` included) and backward passes."""

    forward: int = 0
    backward: int = 0
    setup_forward: int = 0


@dataclass
class EditResult:
    """The edited video, the JSON report, and typed views of the report's figures."""

    frames: np.ndarray  # (F, H, W, 3) uint8, the edited video
    report: dict = field(default_factory=dict)
    working: torch.Tensor | None = None  # the edited working tensor (1, C, F, h, w), fp32 on CPU
    mask: np.ndarray | None = None  # (F, H, W) the mask the edit used (given or estimated), 1 = editable

    @property
    def timings(self) -> Timings:
        names = {f.name for f in dataclasses.fields(Timings)}
        return Timings(**{k: v for k, v in self.report.get("timings", {}).items() if k in names})

    @property
    def evaluations(self) -> Evaluations:
        return Evaluations(**self.report.get("evaluations", {}))

    @property
    def peak_memory_bytes(self) -> int | None:
        return self.report.get("peak_memory_bytes")

    @property
    def losses(self) -> dict[str, float]:
        """The last step's loss terms (``vdds``, ``s_ssm``, ``t_ssm``)."""
        return dict(self.report.get("final_losses", {}))

    @property
    def steps_run(self) -> int | None:
        return self.report.get("steps_run")


def check_frames(frames: np.ndarray, backbone: Backbone) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise FastDMError("frames must be a uint8 array shaped (F, H, W, 3)")
    f, h, w, _ = frames.shape
    if f < 1:
        raise FastDMError("the video has no frames")
    m = backbone.info.size_multiple
    if h % m or w % m:
        raise FastDMError(f"frame size {w}x{h} is not a multiple of {m}, which this model needs; resize with `size`")
    problem = backbone.frame_count_problem(f)
    if problem:
        raise FastDMError(problem)


def mask_to_working(mask: np.ndarray | None, frames: np.ndarray, backbone: Backbone, graded: bool = False) -> torch.Tensor | None:
    """A pixel mask (F, H, W) (1 = editable) -> working-space mask (1, 1, F, h, w) on the backbone's device.
    ``graded``: weights in [0, 1] kept as they are (a latent cell takes its largest pixel weight), else 0/1."""
    if mask is None:
        return None
    if mask.shape != frames.shape[:3]:
        raise FastDMError(f"mask is {mask.shape[0]} frames of {mask.shape[2]}x{mask.shape[1]}, the video {frames.shape[0]} "
                          f"frames of {frames.shape[2]}x{frames.shape[1]}; give a mask with the video's frame count and size")
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[:, None]  # (F, 1, H, W)
    factor = backbone.info.spatial_factor
    if factor > 1:  # any editable pixel makes its latent cell editable
        m = torch.nn.functional.max_pool2d(m, factor)
    m = backbone.mask_frames_to_working(m if graded else (m > 0.5).float())  # (F_working, 1, h, w)
    return m.permute(1, 0, 2, 3).unsqueeze(0).to(backbone.device)


class _PeakMemory:
    """Peak memory of one call: CUDA max allocated, or on Linux the process's peak RSS since the call
    began (the kernel's high-water mark is reset through /proc/self/clear_refs).

    Both counters are process-wide: a reset by one call would cut the figure of another call running
    at the same time. So only a call that starts while no other call is measuring resets them; a call
    that overlaps another reads the shared high-water mark and says so in its ``kind``
    (``..._shared``)."""

    _active = 0
    _guard = threading.Lock()

    def __init__(self, device: torch.device):
        self.device = device
        with _PeakMemory._guard:
            alone = _PeakMemory._active == 0
            _PeakMemory._active += 1
        self._open = True
        self.kind = "cuda_max_allocated"
        if device.type == "cuda":
            if alone:
                torch.cuda.reset_peak_memory_stats(device)
            else:
                self.kind += "_shared"
            return
        if not alone:
            self.kind = "process_peak_rss_shared"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "process_peak_rss_during_call"
        except OSError:
            self.kind = "process_peak_rss_lifetime"

    def close(self) -> None:
        """The call is over: a later call may reset the counters again."""
        if self._open:
            self._open = False
            with _PeakMemory._guard:
                _PeakMemory._active -= 1

    def __del__(self):
        self.close()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class DreamMotionPipeline:
    """DreamMotion edits with one loaded backbone, diffusers-style.

    ``pipe = DreamMotionPipeline.from_pretrained(folder, device="cuda", dtype="bf16")``, then
    ``result = pipe(frames, "a red circle", "a blue circle", mask=None, steps=200, plan="fast")``.
    Prints nothing, keeps no global state; see the module docstring for the threading contract.
    """

    def __init__(self, backbone: Backbone, *, prompt_cache_size: int = PROMPT_CACHE_SIZE,
                 release_text_encoder: bool = False):
        self.backbone = backbone
        self.lock = threading.RLock()
        self.prompt_cache_size = prompt_cache_size
        self.release_text_encoder = release_text_encoder
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._engines: dict[tuple, object] = {}
        self.engine_builds: list[dict] = []  # one record per engine built: kind, key, seconds

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: str = "cpu", dtype: str = "fp32", *, allow_pickle: bool = False,
                        trust_remote_code: bool = False, attention: str = "sdpa", **kwargs) -> "DreamMotionPipeline":
        """Load a local diffusers-format folder (default: the bundled shapes model)."""
        from ..backbone import default_model_path

        backbone = load_backbone(path or default_model_path(), device, dtype, allow_pickle, trust_remote_code)
        backbone.set_attention(attention)
        return cls(backbone, **kwargs)

    def to(self, device=None, dtype: str | torch.dtype | None = None) -> "DreamMotionPipeline":
        """Move the backbone; engines and cached prompt embeddings are dropped (they are device- and dtype-bound)."""
        from ..backbone import parse_dtype

        with self.lock:
            self.backbone.to(device, parse_dtype(dtype) if isinstance(dtype, str) else dtype)
            self._engines.clear()
            self._prompts.clear()
        return self

    @property
    def cached_prompts(self) -> list[str]:
        """Prompts whose embeddings are cached, oldest first."""
        with self.lock:
            return list(self._prompts)

    # -- shared state (under the lock) -----------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings ``(len(prompts), L, D)``; the last ``prompt_cache_size`` prompts stay cached."""
        with self.lock:
            todo = [p for p in dict.fromkeys(prompts) if p not in self._prompts]
            fresh = dict(zip(todo, self.backbone.encode_prompts(todo))) if todo else {}
            got = {p: fresh[p] if p in fresh else self._prompts[p] for p in prompts}
            for p in dict.fromkeys(prompts):
                self._prompts[p] = got[p]
                self._prompts.move_to_end(p)
            while len(self._prompts) > self.prompt_cache_size:
                self._prompts.popitem(last=False)
            if self.release_text_encoder:
                self.backbone.release_text_encoder()
            return torch.stack([got[p] for p in prompts])

    def engine(self, kind: str, *, batch: int, frames: int, size: tuple[int, int], layers: list[str],
               grad_until: str | None = None, cache_dir: str | None = None, text: torch.Tensor | None = None):
        """The engine for these shapes, built (and compiled or exported) on first use; returns
        ``(engine, seconds spent building it in this call)``."""
        bb = self.backbone
        key = (kind, batch, frames, tuple(size), tuple(layers), grad_until, str(bb.dtype), str(bb.device))
        with self.lock:
            if key in self._engines:
                return self._engines[key], 0.0
            from .engines import build_engine

            t0 = time.perf_counter()
            engine = build_engine(bb, kind, batch=batch, frames=frames, size=size, layers=layers, cache_dir=cache_dir,
                                  grad_until=grad_until, warm_text=text)
            seconds = time.perf_counter() - t0
            self._engines[key] = engine
            self.engine_builds.append({"kind": kind, "batch": batch, "frames": frames, "size": list(size),
                                       "grad": grad_until is not None, "seconds": round(seconds, 3)})
            return engine, seconds

    # -- edits ----------------------------------------------------------------------------------
    def prepare(self, video: np.ndarray, source_prompt: str | None = None, target_prompt: str | None = None,
                mask: np.ndarray | None = None, **kwargs) -> "EditRun":
        """Validate a request and set it up (see :class:`EditRun` for the options)."""
        return EditRun(self, video, source_prompt, target_prompt, mask, **kwargs)

    def __call__(self, video: np.ndarray, source_prompt: str | None = None, target_prompt: str | None = None,
                 mask: np.ndarray | None = None, *, callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("x",), **kwargs) -> EditResult:
        """Edit ``video`` ((F, H, W, 3) uint8) from ``source_prompt`` to ``target_prompt``.

        ``mask`` ((F, H, W), 1 = editable; ``"auto"``: estimated from the model's cross-attention
        on the source video, see :mod:`fastdm.automask`; the report's ``auto_mask`` says how, and
        ``result.mask`` holds it). Settings: any :class:`EditConfig` field by name (``steps``,
        ``lr``, ``seed``, ...) or ``config=EditConfig(...)``; ``plan`` (``"fast"``, ``"fast-seq"``,
        ``"lean"``, ``"plain"``, ``"naive"`` or an :class:`ExecutionPlan`), ``backend`` (engine of the
        no-grad calls), ``compile_grad``, ``memory_budget`` (bytes; picks the plan),
        ``checkpoint_dir`` / ``checkpoint_every`` / ``resume``, ``engine_cache``.

        ``callback_on_step_end(pipe, step, t, tensors)`` runs after every step (diffusers'
        convention): ``tensors`` holds the names in ``callback_on_step_end_tensor_inputs`` among
        ``x`` (the edited working tensor), ``x_src``, ``grad`` (the applied update), ``losses`` (a dict
        of 0-dim tensors), ``seconds`` (the step's wall time) and ``grad_parts`` (V-DDS, S-SSM and T-SSM parts of the update, S-SSM/T-SSM at
        unit weight; asking for it costs a second backward). It may return a dict: ``"x"`` replaces
        the edited tensor, ``"stop": True`` ends the edit after this step (the result covers the steps
        run).
        """
        unknown = [n for n in callback_on_step_end_tensor_inputs if n not in CALLBACK_TENSORS]
        if unknown:  # before anything is prepared, not at the end of the first step
            raise BadInput(f"callback_on_step_end_tensor_inputs: unknown {unknown}; choose from {', '.join(CALLBACK_TENSORS)}",
                           field="callback_on_step_end_tensor_inputs")
        run = self.prepare(video, source_prompt, target_prompt, mask,
                           split_gradients="grad_parts" in callback_on_step_end_tensor_inputs, **kwargs)
        while not run.done:
            run.step()
            if callback_on_step_end is not None:
                ret = callback_on_step_end(self, run.step_index, run.last_t, run.tensors(callback_on_step_end_tensor_inputs))
                if ret and run.apply_callback(ret):
                    break
        return run.finish()


class EditRun:
    """One edit in progress on a pipeline: validated inputs, the edited tensor, its optimizer,
    random generator, step and engines. :meth:`step` is the step loop's body."""

    def __init__(self, pipe: DreamMotionPipeline, video: np.ndarray, source_prompt: str | None, target_prompt: str | None,
                 mask: np.ndarray | None, *, config: EditConfig | None = None, plan: str | ExecutionPlan | None = None,
                 backend: str = "eager", compile_grad: bool = False, memory_budget: int | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                 engine_cache: str | None = None, split_gradients: bool = False, preset: str | None = None, **settings):
        self.pipe, bb = pipe, pipe.backbone
        self.timings = {"start": time.perf_counter()}
        self.memory = _PeakMemory(bb.device)
        config = self._config(config, source_prompt, target_prompt, settings, preset, bb)
        if memory_budget is not None and plan is not None:
            raise FastDMError("give an execution plan or a memory budget, not both")
        if isinstance(plan, str):
            if plan not in PLANS:
                raise FastDMError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
            plan = PLANS[plan]
        check_frames(video, bb)
        vcfg = VDDSConfig(config.guidance_scale, config.t_min, config.t_max, config.weighting)
        vcfg.validate(bb.info.num_train_timesteps)
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise FastDMError("`checkpoint_every` must be an integer >= 0")
        if (checkpoint_every or resume) and not checkpoint_dir:
            raise FastDMError("checkpointing needs a checkpoint folder")
        need_keys = config.s_ssm_weight > 0 or config.t_ssm_weight > 0
        reasons = (plan or FAST).not_supported_reasons(backend=backend, compile_grad=compile_grad, need_keys=need_keys)
        if reasons:  # (the budget's candidates, fast / fast-seq / lean, accept the same options as fast)
            raise FastDMError("; ".join(reasons))
        if backend != "eager":
            from .engines import engine_unsupported_reasons

            reasons = engine_unsupported_reasons(backend, bb)
            if reasons:
                raise FastDMError(f"`backend={backend}`: {'; '.join(reasons)}")
        self.config, self.vcfg, self.backend, self.compile_grad = config, vcfg, backend, compile_grad
        self.layers = resolve_layers(bb, config.tap_layers) if need_keys else []
        self.num_frames, self.size = video.shape[0], (video.shape[2], video.shape[1])
        self.checkpoint_dir, self.checkpoint_every, self.engine_cache = checkpoint_dir, checkpoint_every, engine_cache
        self.split_gradients = split_gradients

        self.text = pipe.encode_prompts([config.target_prompt, config.negative_prompt, config.source_prompt])
        self.timings["encode_s"] = time.perf_counter() - self.timings["start"]
        with pipe.lock, bb.vae_tiling((plan or FAST).vae_tiling):
            self.x_src = bb.to_working(frames_to_tensor(video))
        # windows: a clip longer than the model's own length is edited window by window (driver/windows.py)
        frames_w = self.x_src.shape[2]
        window = config.window or bb.native_frames()
        self.window = window if frames_w > window else None
        self.step_frames = self.num_frames
        if self.window is not None:
            v0, v1 = bb.working_to_video_range(0, self.window)
            self.step_frames = v1 - v0  # the video frames one window holds (what taps and engines see)
        self.auto_mask = None
        if isinstance(mask, str):
            if mask != "auto":
                raise FastDMError(f"mask {mask!r}: give an (F, H, W) array, \"auto\" (estimated from the model's cross-attention) or None")
            from ..automask import estimate_mask

            if getattr(bb, "guidance_distilled", False):  # (the guidance input of this edit, not whatever the last call left there)
                bb.embedded_guidance = config.guidance_scale

            with pipe.lock:  # hooks on the denoiser for one batch-2 call
                self.auto_mask = estimate_mask(bb, self.x_src, self.text[[2, 0]], config.source_prompt, config.target_prompt,
                                               self.size, seed=config.seed, num_frames=self.num_frames, window=self.window)
            mask = self.auto_mask.mask
        graded = self.auto_mask is not None and self.auto_mask.mask is not None and config.soft_mask > 0
        weights = mask
        if graded:  # the update inside the mask weighted by the cross-attention map (EditConfig.soft_mask)
            from ..automask import graded_mask

            weights = graded_mask(self.auto_mask, config.soft_mask)
        self.mask = mask_to_working(weights, video, bb, graded=graded)
        self.masked = mask is not None
        self.pixel_mask = None if mask is None else np.asarray(mask, np.float32)
        self.x = torch.nn.Parameter(self.x_src.clone())
        if config.optimizer == "sgd":
            self.opt = torch.optim.SGD([self.x], lr=config.lr, **({"momentum": config.momentum} if config.momentum else {}))
        else:
            self.opt = torch.optim.Adam([self.x], lr=config.lr)
        self.t_order = strata_order(config.steps, config.seed) if config.t_schedule == "stratified" else None
        self.convergence = ConvergenceRule(config.stop_window, config.stop_tol, self.mask) if config.stop == "converged" else None
        self.extension = (ExtensionRule(config.steps, config.extend_segment, config.extend_max, config.extend_tol, config.extend_on)
                          if config.stop == "extend" else None)
        self.gen = torch.Generator("cpu").manual_seed(config.seed)
        self.fingerprint = hashlib.sha256(f"{config.fingerprint()}|{bb.info.path}|{bb.dtype}|{bb.device.type}".encode()).hexdigest()[:16]
        h = hashlib.sha256(np.ascontiguousarray(video).tobytes())
        if mask is not None:
            h.update(np.ascontiguousarray(mask, dtype=np.float32).tobytes())
        self.input_fingerprint = h.hexdigest()[:16]
        self.start_step = 0
        self.resumed = resume
        if resume:
            state = load_checkpoint(checkpoint_dir, fingerprint=self.fingerprint, input_fingerprint=self.input_fingerprint)
            if state["step"] > config.cap:  # (an extended edit's steps are in its fingerprint: only a plain edit gets here)
                raise ResumeMismatch(f"`resume`: the checkpoint is at step {state['step']}, past this edit's last step "
                                     f"({config.cap}); raise `steps`")
            if self.extension is not None:
                records = state.get("extension")
                if records is None or len(records) != state["step"]:
                    raise ResumeMismatch(f"`resume={checkpoint_dir}`: the checkpoint does not carry the extension rule's records; "
                                         "start a new edit")
                self.extension.records = [list(map(float, r)) for r in records.tolist()]
            with torch.no_grad():
                self.x.copy_(state["x"].to(self.x.device))
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(state["rng"])
            self.start_step = state["step"]
        self.timings["prepare_s"] = time.perf_counter() - self.timings["start"] - self.timings["encode_s"]

        self.engine_build_s = 0.0
        self.steppers: list[DreamMotionStep] = []  # every step object made (budget probes too): their evaluations count
        self.probes = None
        self.memory_budget = memory_budget
        if memory_budget is not None:
            from .budget import fit_plan

            with pipe.lock:  # the probes run whole steps: hooks, block checkpointing and engines are shared state
                n = self.window or frames_w  # a windowed edit's step holds one window
                plan, self.probes = fit_plan(self._make_step, bb, self.x[:, :, :n], self.x_src[:, :, :n], memory_budget)
        self.plan = plan or FAST
        self.stepper = self._make_step(self.plan)
        self.step_index = self.start_step
        self.stopped_early = False
        self.window_evaluations = 0  # windows run so far (windowed edits)
        self.converged_at: int | None = None
        self.last_t: int | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.step_times: list[float] = []

    def _config(self, config, source_prompt, target_prompt, settings, preset=None, bb=None) -> EditConfig:
        """The edit's config: ``config`` as given (with prompts/settings on top), or resolved in layers: the built-in
        defaults, the family's fallback, the model folder's ``fastdm.json`` defaults, the preset, the settings
        (:func:`~fastdm.driver.config.resolve_config`; ``settings_source`` says where each came from)."""
        self.settings_source = None
        names = {f.name for f in dataclasses.fields(EditConfig)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise FastDMError(f"unknown setting(s) {', '.join(unknown)}; settings are EditConfig fields: {', '.join(sorted(names))}")
        if config is None:
            if source_prompt is None or target_prompt is None:
                raise FastDMError("give source_prompt and target_prompt (or config=EditConfig(...))")
            from .config import check_defaults, resolve_config

            folder = getattr(bb, "settings", None) or {}
            model_defaults = check_defaults(folder["defaults"], f"{bb.info.path}/fastdm.json") if "defaults" in folder else {}
            config, self.settings_source = resolve_config(preset, source_prompt, target_prompt, settings, model_defaults=model_defaults,
                                                          family_defaults=getattr(bb, "edit_defaults", {}),
                                                          family=f"family {getattr(bb, 'family', '')}".strip())
        elif preset is not None:
            raise FastDMError("give a preset or config=EditConfig(...), not both")
        else:
            prompts = {k: v for k, v in (("source_prompt", source_prompt), ("target_prompt", target_prompt)) if v is not None}
            config = dataclasses.replace(config, **prompts, **settings) if (prompts or settings) else config
        config.validate()
        return config

    def _make_step(self, plan: ExecutionPlan) -> DreamMotionStep:
        """The step of ``plan`` with its engines (built once per shape by the pipeline)."""
        engine = grad_engine = None
        if self.backend != "eager":
            engine, s = self.pipe.engine(self.backend, batch=plan.nograd_batch, frames=self.step_frames, size=self.size,
                                         layers=self.layers, cache_dir=self.engine_cache, text=self.text[[1, 2, 1]])
            self.engine_build_s += s
        if self.compile_grad:
            grad_engine, s = self.pipe.engine("compile", batch=1, frames=self.step_frames, size=self.size, layers=self.layers,
                                              grad_until=self.layers[-1], text=self.text[:1])
            self.engine_build_s += s
        stepper = DreamMotionStep(self.pipe.backbone, self.config, plan, self.vcfg, self.layers, self.step_frames, self.text,
                                  None if self.window else self.mask, engine, grad_engine, split_gradients=self.split_gradients)
        self.steppers.append(stepper)
        return stepper

    @property
    def evaluations(self) -> dict[str, int]:
        """Denoiser work so far, counted at the call sites: forward batch elements and backward passes of
        the edit's steps, and forward batch elements spent before them (automatic mask, budget probes)."""
        out = {"forward": 0, "backward": 0}
        for s in self.steppers:
            out["forward"] += s.evaluations["forward"]
            out["backward"] += s.evaluations["backward"]
        setup = sum(s.evaluations["forward"] for s in self.steppers if s is not getattr(self, "stepper", None))
        if self.auto_mask is not None:  # its calls, each a batch of the source under both prompts
            mask_forward = self.auto_mask.denoiser_calls * self.auto_mask.report()["batch"]
            setup += mask_forward
            out["forward"] += mask_forward
        out["setup_forward"] = setup
        return out

    @property
    def planned_steps(self) -> int:
        """Steps this edit runs as decided so far: ``steps``, or more where the extension rule continued it."""
        return self.extension.planned if self.extension is not None else self.config.steps

    @property
    def done(self) -> bool:
        return self.step_index >= self.planned_steps or self.stopped_early

    def step(self) -> dict[str, torch.Tensor]:
        """Run one step (under the pipeline's lock); returns the loss terms as 0-dim tensors."""
        bb, x = self.pipe.backbone, self.x
        t0 = time.perf_counter()
        cfg = self.config
        extending = self.extension is not None and self.step_index >= cfg.steps
        with self.pipe.lock:
            if extending:  # a continuation segment (driver/schedule.py ExtensionRule)
                t = extension_timestep(self.step_index, cfg.steps, cfg.extend_segment, self.vcfg, self.gen, cfg.extend_span)
            else:
                t = draw_timestep(cfg.t_schedule, self.step_index, cfg.steps, self.vcfg, self.gen, self.t_order)
            noise = torch.randn(x.shape, generator=self.gen).to(bb.device, non_blocking=True)
            self.opt.zero_grad(set_to_none=True)
            if self.window is None:
                self.losses = self.stepper(x, self.x_src, t, noise)
            else:
                self.losses = self._windowed(t, noise)
            if extending:
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr * extension_lr_factor(self.step_index, cfg.steps, cfg.extend_segment, cfg.extend_lr)
            elif cfg.lr_schedule != "constant":
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, self.step_index, cfg.steps)
            lr_used = self.opt.param_groups[0]["lr"]
            if self.extension is not None:  # (the movement of this step, inside the mask, for the extension rule)
                x_before = (x.detach() * self.mask if self.mask is not None else x.detach()).clone()
            self.opt.step()
            if bb.valid_range is not None:
                with torch.no_grad():
                    x.clamp_(*bb.valid_range)
        self.step_index += 1
        self.last_t = t
        if self.extension is not None and bb.device.type != "meta":
            with torch.no_grad():
                moved = float(((x.detach() * self.mask if self.mask is not None else x.detach()) - x_before).float().norm())
            self.extension.observe(t, float(self.losses["vdds"]), moved, lr_used)
        if self.convergence is not None and self.convergence.update(x) and self.step_index < cfg.steps:
            self.stopped_early = True
            self.converged_at = self.step_index
        done = self.step_index
        last = done >= self.planned_steps
        checkpoint_now = self.checkpoint_every and (done % self.checkpoint_every == 0 or last or self.converged_at == done)
        due = checkpoint_now or last or self.converged_at == done or bb.device.type == "cpu" or done % FINITE_CHECK_EVERY == 0
        if due and bb.device.type != "meta":  # (meta: FLOP counting, no values to check)
            self._check_finite()
        if checkpoint_now:
            self.save_checkpoint()
        self.step_times.append(time.perf_counter() - t0)
        return self.losses

    def _windowed(self, t: int, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step of a windowed edit: the step's t and noise for the whole clip; the model on each window
        of this step's placement (a random phase; :func:`fastdm.driver.windows.window_starts`), each
        window's update into its frames, frames two windows share getting the mean of both; so every
        frame gets one update per step, as in an edit of one window."""
        x, n = self.x, self.window
        stride = window_stride(n, self.config.window_overlap)
        starts = window_starts(x.shape[2], n, int(torch.randint(0, stride, (1,), generator=self.gen).item()), stride)
        cover = coverage(x.shape[2], n, starts).to(x.device)
        grad = torch.zeros_like(x)
        totals: dict[str, torch.Tensor] = {}
        for s in starts:
            w = x.detach()[:, :, s:s + n].clone().requires_grad_(True)
            self.stepper.mask = None if self.mask is None else self.mask[:, :, s:s + n]
            losses = self.stepper(w, self.x_src[:, :, s:s + n], t, noise[:, :, s:s + n])
            grad[:, :, s:s + n] += w.grad / cover[s:s + n].view(1, 1, -1, 1, 1)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v / len(starts)
        x.grad = grad
        self.window_evaluations += len(starts)
        return totals

    def _check_finite(self) -> None:
        bad = [k for k, v in self.losses.items() if not torch.isfinite(v).all()]
        if not torch.isfinite(self.x).all():
            bad.append("edited video")
        if bad:
            kept = ""
            if self.checkpoint_every:
                kept = f"; the last good checkpoint is kept in {self.checkpoint_dir}"
            raise Diverged(f"the edit diverged by step {self.step_index} ({', '.join(bad)} not finite); lower `lr` or the "
                              f"S-SSM/T-SSM weights{kept}")

    def save_checkpoint(self) -> None:
        extra = {} if self.extension is None else {"extension": torch.tensor(self.extension.records, dtype=torch.float64).reshape(-1, 4)}
        save_checkpoint(self.checkpoint_dir, step=self.step_index, x=self.x, optimizer_state=self.opt.state_dict(),
                        rng_state=self.gen.get_state(), fingerprint=self.fingerprint, input_fingerprint=self.input_fingerprint, **extra)

    def tensors(self, names) -> dict:
        """What a step-end callback asked for (see :meth:`DreamMotionPipeline.__call__`)."""
        avail = {"x": lambda: self.x.detach(), "x_src": lambda: self.x_src, "grad": lambda: self.x.grad,
                 "losses": lambda: dict(self.losses), "grad_parts": lambda: dict(self.stepper.grad_parts),
                 "seconds": lambda: self.step_times[-1]}
        unknown = [n for n in names if n not in avail]
        if unknown:
            raise FastDMError(f"callback_on_step_end_tensor_inputs: unknown {unknown}; choose from {', '.join(avail)}")
        return {n: avail[n]() for n in names}

    def apply_callback(self, ret: dict) -> bool:
        """Apply a callback's returned dict; True when it asked the edit to stop."""
        if "x" in ret and ret["x"] is not None and ret["x"] is not self.x:
            with torch.no_grad():
                self.x.copy_(ret["x"])
        self.stopped_early = bool(ret.get("stop", False))
        return self.stopped_early

    def finish(self) -> EditResult:
        """Decode the edited tensor and build the report."""
        bb, config, plan = self.pipe.backbone, self.config, self.plan
        t_dec = time.perf_counter()
        with self.pipe.lock, bb.vae_tiling(plan.vae_tiling):
            out = tensor_to_frames(bb.from_working(self.x.detach()))
        times = self.step_times
        report = {
            "config": config.to_dict(),
            "settings_source": self.settings_source,
            "model": {"path": bb.info.path, "class": bb.info.name, "space": bb.info.space,
                      "prediction_type": bb.info.prediction_type, "device": str(bb.device),
                      "dtype": str(bb.dtype).replace("torch.", "")},
            "video": {"frames": int(self.num_frames), "width": int(self.size[0]), "height": int(self.size[1]),
                      "working_shape": list(self.x.shape), "masked": self.masked},
            "tap_layers": self.layers,
            "plan": plan.to_dict(),
            "memory_budget": None if self.memory_budget is None else {"bytes": int(self.memory_budget), "probed_peak_bytes": self.probes},
            "engine": {"nograd": self.backend, "grad": "compile" if self.compile_grad else "eager"},
            "backend": self.backend,
            "compile_grad": bool(self.compile_grad),
            "steps_run": len(times),
            "stopped_early": self.stopped_early,
            "stop": {"rule": config.stop, "cap": config.cap,
                     "stopped_at": self.step_index,
                     "converged": self.converged_at is not None,
                     **(self.convergence.report() if self.convergence is not None else {}),
                     **({"extension": self.extension.report()} if self.extension is not None else {})},
            "evaluations": self.evaluations,
            "windows": None if self.window is None else {
                "window": self.window, "working_frames": int(self.x.shape[2]), "windows_run": self.window_evaluations,
                "windows_per_step": round(self.window_evaluations / max(1, len(times)), 3),
                "updates_per_frame": len(times)},
            "resumed_from_step": self.start_step if self.resumed else None,
            "timings": {
                "encode_prompts_s": round(self.timings["encode_s"], 4),
                "prepare_s": round(self.timings["prepare_s"], 4),
                "engine_build_s": round(self.engine_build_s, 4),
                "step_mean_s": round(float(np.mean(times)), 4) if times else None,
                "step_median_s": round(float(np.median(times)), 4) if times else None,
                "decode_s": round(time.perf_counter() - t_dec, 4),
                "total_s": round(time.perf_counter() - self.timings["start"], 4),
            },
            "peak_memory_bytes": self.memory.read(),
            "peak_memory_kind": self.memory.kind,  # (read before close: the call's own high-water mark)
            "final_losses": {k: float(v) for k, v in self.losses.items() if v.device.type != "meta"},
        }
        if self.auto_mask is not None:
            report["auto_mask"] = self.auto_mask.report()
            report["auto_mask"]["graded"] = self.config.soft_mask if self.auto_mask.mask is not None else 0.0  # (soft_mask)
            report["timings"]["auto_mask_s"] = round(self.auto_mask.seconds, 4)
        if self.pipe.backbone.dtype == torch.float16:  # step calls of this run (one per window in windowed edits,
            # budget probes left out) whose structure gradient overflowed fp16 and was dropped
            report["fp16_structure_drops"] = int(self.stepper.fp16_dropped)
        self.memory.close()
        return EditResult(out, report, self.x.detach().cpu(), self.pixel_mask)
