"""The optimizer driver: runs an edit step by step, with checkpoints."""

from .config import EditConfig
from .editor import EditResult, Editor, StepInfo, edit

__all__ = ["EditConfig", "EditResult", "Editor", "StepInfo", "edit"]
