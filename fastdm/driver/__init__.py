"""The optimizer driver: the pipeline, its one step loop, plans, budget and checkpoints."""

from .config import EditConfig
from .editor import Editor, StepInfo, edit
from .pipeline import DreamMotionPipeline, EditResult, EditRun
from .plan import PLANS, ExecutionPlan

__all__ = ["DreamMotionPipeline", "EditRun", "EditConfig", "EditResult", "Editor", "ExecutionPlan", "PLANS", "StepInfo", "edit"]
