"""The older ``Editor.edit(frames, config, ...)`` API and the one-shot :func:`edit`, as thin
wrappers over :class:`fastdm.driver.pipeline.DreamMotionPipeline` (the one implementation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backbone import Backbone
from .config import EditConfig
from .pipeline import DreamMotionPipeline, EditResult
from .plan import ExecutionPlan


@dataclass
class StepInfo:
    step: int  # 1-based, after the update
    total_steps: int
    timestep: int
    losses: dict[str, float]
    seconds: float


class Editor(DreamMotionPipeline):
    """A :class:`DreamMotionPipeline` with the ``edit(frames, config)`` call form."""

    def __init__(self, backbone: Backbone, keep_text_encoder: bool = True):
        super().__init__(backbone, release_text_encoder=not keep_text_encoder)

    @classmethod
    def from_pretrained(cls, model: str | None = None, device: str = "cpu", dtype: str = "fp32", allow_pickle: bool = False,
                        trust_remote_code: bool = False, keep_text_encoder: bool = True) -> "Editor":
        from ..backbone import default_model_path, load_backbone

        return cls(load_backbone(model or default_model_path(), device, dtype, allow_pickle, trust_remote_code), keep_text_encoder)

    def edit(self, frames: np.ndarray, config: EditConfig, mask: np.ndarray | None = None,
             callback: Callable[[StepInfo], None] | None = None, plan: ExecutionPlan | str | None = None, **kwargs) -> EditResult:
        """``pipe(frames, config=config, mask=mask, plan=plan, ...)``; ``callback(StepInfo)`` per step
        (it reads the losses as floats, which synchronizes with the device)."""

        def on_step_end(pipe, step, t, tensors):
            callback(StepInfo(step, max(config.steps, step), t, {k: float(v) for k, v in tensors["losses"].items()}, tensors["seconds"]))

        return self(frames, config=config, mask=mask, plan=plan, callback_on_step_end=on_step_end if callback else None,
                    callback_on_step_end_tensor_inputs=("losses", "seconds"), **kwargs)


def edit(frames: np.ndarray, config: EditConfig, model: str | None = None, device: str = "cpu", dtype: str = "fp32",
         mask: np.ndarray | None = None, callback: Callable[[StepInfo], None] | None = None, **kwargs) -> EditResult:
    """One-shot edit: load ``model`` (default: the bundled model), edit, release everything."""
    return Editor.from_pretrained(model, device, dtype, keep_text_encoder=False).edit(frames, config, mask=mask,
                                                                                       callback=callback, **kwargs)
