"""Backbones: the frozen text-to-video model behind a small interface of our own."""

from .base import Backbone, BackboneInfo
from .loader import BUNDLED, bundled_model_path, default_model_path, load_backbone, parse_dtype, resolve_model

__all__ = ["Backbone", "BackboneInfo", "BUNDLED", "bundled_model_path", "load_backbone", "default_model_path", "parse_dtype",
           "resolve_model"]
