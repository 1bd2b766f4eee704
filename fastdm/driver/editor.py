"""The optimizer driver: one DreamMotion edit.

Per step (one t, one noise e, shared by both branches):

1. x_t = sqrt(a_t) x + sqrt(1 - a_t) e and x^_t likewise from the source x^.
2. Grad branch: UNet(x_t, target prompt) with autograd on, keys tapped (only when S-SSM/T-SSM
   are on; otherwise everything runs without autograd).
3. No-grad branch, one batched call: UNet(x_t, ""), UNet(x^_t, source), UNet(x^_t, ""); the
   source keys are tapped from UNet(x^_t, source).
4. V-DDS gradient = 2000/(h w) * w(t) * mask * (e_cfg(x_t, target) - e_cfg(x^_t, source)).
5. S-SSM + T-SSM losses on the tapped keys, backpropagated to x through the UNet prefix;
   the V-DDS gradient is added to x.grad; optimizer step; x is clamped to the valid range.

Only the edited tensor is optimized; every model parameter is frozen. Randomness (t and e) comes
from one CPU generator seeded by ``config.seed``, so a CPU run is bit-for-bit reproducible and a
checkpointed run resumes exactly.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..backbone import Backbone, load_backbone
from ..errors import FastDMError
from ..losses import VDDSConfig, sample_timestep
from ..taps import resolve_layers
from .checkpoint import load_checkpoint, save_checkpoint
from .config import EditConfig
from .plan import FAST, ExecutionPlan
from .step import DreamMotionStep


@dataclass
class StepInfo:
    step: int  # 1-based, after the update
    total_steps: int
    timestep: int
    losses: dict[str, float]
    seconds: float


@dataclass
class EditResult:
    frames: np.ndarray  # (F, H, W, 3) uint8, the edited video
    report: dict = field(default_factory=dict)
    working: torch.Tensor | None = None  # the edited working tensor (1, C, F, h, w), fp32 on CPU


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class Editor:
    """Runs DreamMotion edits with one loaded backbone. Holds no global state and prints nothing."""

    def __init__(self, backbone: Backbone, keep_text_encoder: bool = True):
        self.backbone = backbone
        self.keep_text_encoder = keep_text_encoder
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, model: str, device: str = "cpu", dtype: str = "fp32", allow_pickle: bool = False,
                        trust_remote_code: bool = False, keep_text_encoder: bool = True) -> "Editor":
        return cls(load_backbone(model, device, dtype, allow_pickle, trust_remote_code), keep_text_encoder)

    # -- helpers ----------------------------------------------------------------------------
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            for p, e in zip(todo, self.backbone.encode_prompts(todo)):
                self._text_cache[p] = e
        if not self.keep_text_encoder:
            self.backbone.release_text_encoder()
        return torch.stack([self._text_cache[p] for p in prompts])

    def check_frames(self, frames: np.ndarray) -> None:
        info = self.backbone.info
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise FastDMError("frames must be a uint8 array shaped (F, H, W, 3)")
        f, h, w, _ = frames.shape
        if f < 1:
            raise FastDMError("the video has no frames")
        m = info.size_multiple
        if h % m or w % m:
            raise FastDMError(f"frame size {w}x{h} is not a multiple of {m}, which this model needs; resize with --size")

    def _mask_to_working(self, mask: np.ndarray | None, frames: np.ndarray) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape != frames.shape[:3]:
            raise FastDMError(f"mask is {mask.shape[0]} frames of {mask.shape[2]}x{mask.shape[1]}, the video {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; give a mask with the video's frame count and size")
        m = torch.from_numpy(np.ascontiguousarray(mask)).float()[:, None]  # (F, 1, H, W)
        factor = self.backbone.info.spatial_factor
        if factor > 1:  # any editable pixel makes its latent cell editable
            m = torch.nn.functional.max_pool2d(m, factor)
        m = (m > 0.5).float()
        return m.permute(1, 0, 2, 3).unsqueeze(0).to(self.backbone.device)  # (1, 1, F, h, w)

    # -- the edit ---------------------------------------------------------------------------
    def edit(
        self,
        frames: np.ndarray,
        config: EditConfig,
        mask: np.ndarray | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        plan: ExecutionPlan | None = None,
        backend: str = "eager",
        engine_cache: str | None = None,
        memory_budget: int | None = None,
        compile_grad: bool = False,
    ) -> EditResult:
        """Edit ``frames`` ((F, H, W, 3) uint8) from ``config``; ``mask`` ((F, H, W), 1 = editable).

        ``plan``: naive / fast (default) / lean (``fastdm.driver.plan``). ``backend``: where the batched
        no-grad UNet call runs: ``"eager"`` (PyTorch), ``"compile"`` / ``"cudagraphs"`` (torch.compile),
        ``"ort"`` (onnxruntime) or ``"trt"`` (TensorRT). ``memory_budget`` (bytes): run the fastest of
        fast / fast-seq / lean whose probed peak fits (``fastdm.driver.budget``); not with ``plan``.
        ``compile_grad``: also ``torch.compile`` the grad branch (its forward up to the last tap and
        its backward), whatever runs the no-grad calls.
        """
        if memory_budget is not None and plan is not None:
            raise FastDMError("give an execution plan or a memory budget, not both")
        config.validate()
        self.check_frames(frames)
        bb = self.backbone
        vcfg = VDDSConfig(config.guidance_scale, config.t_min, config.t_max, config.weighting)
        vcfg.validate(bb.info.num_train_timesteps)
        if checkpoint_every < 0:
            raise FastDMError("--checkpoint-every must be >= 0")
        if (checkpoint_every or resume) and not checkpoint_dir:
            raise FastDMError("checkpointing needs a checkpoint folder")
        need_keys = config.s_ssm_weight > 0 or config.t_ssm_weight > 0
        layers = resolve_layers(bb, config.tap_layers) if need_keys else []
        num_frames = frames.shape[0]
        timings = {"start": time.perf_counter()}
        if bb.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bb.device)

        text = self._embed([config.target_prompt, config.negative_prompt, config.source_prompt])
        timings["encode_s"] = time.perf_counter() - timings["start"]

        x_src = bb.to_working(frames_to_tensor(frames))
        mask_w = self._mask_to_working(mask, frames)
        x = torch.nn.Parameter(x_src.clone())
        opt = torch.optim.SGD([x], lr=config.lr) if config.optimizer == "sgd" else torch.optim.Adam([x], lr=config.lr)
        gen = torch.Generator("cpu").manual_seed(config.seed)
        lo_hi = bb.valid_range

        fp = hashlib.sha256(f"{config.fingerprint()}|{bb.info.path}|{bb.dtype}|{bb.device.type}".encode()).hexdigest()[:16]
        hin = hashlib.sha256(np.ascontiguousarray(frames).tobytes())
        if mask is not None:
            hin.update(np.ascontiguousarray(mask, dtype=np.float32).tobytes())
        input_fp = hin.hexdigest()[:16]
        start_step = 0
        if resume:
            state = load_checkpoint(checkpoint_dir, fingerprint=fp, input_fingerprint=input_fp)
            if state["step"] > config.steps:
                raise FastDMError(f"--resume: the checkpoint is at step {state['step']}, past --steps {config.steps}; raise --steps")
            with torch.no_grad():
                x.copy_(state["x"].to(x.device))
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["rng"])
            start_step = state["step"]
        timings["prepare_s"] = time.perf_counter() - timings["start"] - timings["encode_s"]

        probes = None
        if memory_budget is not None:
            from .budget import fit_plan

            def make_step(p):
                return DreamMotionStep(bb, config, p, vcfg, layers, num_frames, text, mask_w)

            plan, probes = fit_plan(make_step, bb, x, x_src, memory_budget)
        plan = plan or FAST
        engine = None
        if backend != "eager":
            from ..backbone.engines import build_engine

            if not layers:
                raise FastDMError(f"--backend {backend} serves the S-SSM/T-SSM no-grad branch; with both weights 0 use --backend eager")
            engine = build_engine(bb, backend, frames=num_frames, size=(frames.shape[2], frames.shape[1]), layers=layers,
                                  cache_dir=engine_cache)
        grad_engine = None
        if compile_grad:
            if not (layers and plan.truncate_backprop):
                raise FastDMError("--compile-grad compiles the truncated S-SSM/T-SSM grad branch; it needs the fast, "
                                  "fast-seq or lean plan and an S-SSM or T-SSM weight above 0")
            from ..backbone.engines import CompiledUNet

            grad_engine = CompiledUNet(bb, layers, grad_until=layers[-1])
        stepper = DreamMotionStep(bb, config, plan, vcfg, layers, num_frames, text, mask_w, engine, grad_engine)
        losses: dict[str, float] = {}
        step_times: list[float] = []
        for step in range(start_step, config.steps):
            t0 = time.perf_counter()
            t = sample_timestep(vcfg, gen)
            noise = torch.randn(x.shape, generator=gen).to(bb.device)
            opt.zero_grad(set_to_none=True)
            losses = {k: float(v) for k, v in stepper(x, x_src, t, noise).items()}
            opt.step()
            if lo_hi is not None:
                with torch.no_grad():
                    x.clamp_(*lo_hi)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            done = step + 1
            if checkpoint_every and (done % checkpoint_every == 0 or done == config.steps):
                save_checkpoint(checkpoint_dir, step=done, x=x, optimizer_state=opt.state_dict(),
                                rng_state=gen.get_state(), fingerprint=fp, input_fingerprint=input_fp)
            if callback is not None:
                callback(StepInfo(done, config.steps, t, dict(losses), dt))

        t_dec = time.perf_counter()
        out = tensor_to_frames(bb.from_working(x.detach()))
        total = time.perf_counter() - timings["start"]
        report = {
            "config": config.to_dict(),
            "model": {"path": bb.info.path, "class": bb.info.name, "space": bb.info.space,
                      "device": str(bb.device), "dtype": str(bb.dtype).replace("torch.", "")},
            "video": {"frames": int(num_frames), "width": int(frames.shape[2]), "height": int(frames.shape[1]),
                      "working_shape": list(x.shape), "masked": mask is not None},
            "tap_layers": layers,
            "plan": plan.to_dict(),
            "memory_budget": None if memory_budget is None else {"bytes": int(memory_budget), "probed_peak_bytes": probes},
            "backend": backend,
            "compile_grad": bool(compile_grad),
            "steps_run": len(step_times),
            "resumed_from_step": start_step if resume else None,
            "timings": {
                "encode_prompts_s": round(timings["encode_s"], 4),
                "prepare_s": round(timings["prepare_s"], 4),
                "step_mean_s": round(float(np.mean(step_times)), 4) if step_times else None,
                "step_median_s": round(float(np.median(step_times)), 4) if step_times else None,
                "decode_s": round(time.perf_counter() - t_dec, 4),
                "total_s": round(total, 4),
            },
            "peak_memory_bytes": _peak_memory_bytes(bb.device),
            "peak_memory_kind": "cuda_max_allocated" if bb.device.type == "cuda" else "process_peak_rss",
            "final_losses": losses,
        }
        return EditResult(out, report, x.detach().cpu())


def edit(frames: np.ndarray, config: EditConfig, model: str | None = None, device: str = "cpu", dtype: str = "fp32",
         mask: np.ndarray | None = None, callback: Callable[[StepInfo], None] | None = None, **kwargs) -> EditResult:
    """One-shot edit: load ``model`` (default: the bundled model), edit, release everything."""
    from ..backbone import default_model_path

    editor = Editor.from_pretrained(model or default_model_path(), device, dtype, keep_text_encoder=False)
    return editor.edit(frames, config, mask=mask, callback=callback, **kwargs)
