"""Backbones: the frozen text-to-video model behind a small interface of our own."""

from .base import Backbone, BackboneInfo
from .loader import default_model_path, load_backbone, parse_dtype

__all__ = ["Backbone", "BackboneInfo", "load_backbone", "default_model_path", "parse_dtype"]
