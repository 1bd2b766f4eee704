"""Cascaded editing: the DreamMotion edit at a base stage's size and keyframes, then interpolation,
super-resolution and refinement stages, one model loaded at a time (``fastdm-edit --cascade FILE``)."""

from .folders import check_stage_folder, load_stage_model
from .runner import check_cascade, run_cascade
from .spec import KINDS, Cascade, Stage, load_cascade, parse_cascade
from .stages import keyframe_positions, output_fps, run_interpolate, run_upscale, sample_conditioned

__all__ = ["KINDS", "Cascade", "Stage", "load_cascade", "parse_cascade", "check_stage_folder", "load_stage_model",
           "check_cascade", "run_cascade", "keyframe_positions", "output_fps", "run_interpolate", "run_upscale",
           "sample_conditioned"]
