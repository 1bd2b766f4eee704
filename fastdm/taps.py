"""Feature taps: capture attention keys at the backbone's key-capture point of chosen layers.

One mechanism, :class:`KeyCapture`, serves every path: a forward hook on each chosen layer's
key module (:meth:`Backbone.key_module`: ``to_k`` in UNet3D) appends its output as it is
computed, so the model's output is unchanged and no extra work is done; the keys keep their
autograd graph when the forward runs with grad enabled. :class:`KeyTaps` uses it around eager
calls; :class:`DenoiserWithKeys` uses it inside the module that ``torch.compile``, ONNX export
and TensorRT run, which returns ``(model output, *keys)``. S-SSM uses the keys per frame, T-SSM
the same keys averaged over space; :meth:`Backbone.keys_to_frames` maps the backbone's token
layout to ``(batch, frames, tokens per frame, channels)``.

Layer choice: glob patterns over qualified module names (``fnmatch``), e.g.
``"up_blocks.1.attentions.*.transformer_blocks.*.attn1"``; ``None`` = the backbone's default.
"""

from __future__ import annotations

import fnmatch

import torch

from .backbone.base import Backbone, attach_stop, detach_stop
from .errors import FastDMError


def resolve_layers(backbone: Backbone, patterns: list[str] | tuple[str, ...] | None) -> list[str]:
    available = backbone.spatial_self_attention_layers()
    if not patterns:
        return backbone.default_tap_layers()
    chosen = [n for n in available if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        sample = ", ".join(list(available)[:4])
        raise FastDMError(
            f"no spatial self-attention layer matches {list(patterns)}; available layers look like: {sample} ..."
        )
    return chosen


class KeyCapture:
    """Hooks on the key modules of ``layers``; :meth:`attach` records their outputs into a list.

    Plain attach/detach calls (no context manager inside traced code) so that dynamo and
    ``torch.export`` trace the hooks as ordinary Python.
    """

    def __init__(self, backbone: Backbone, layers: list[str]):
        available = backbone.spatial_self_attention_layers()
        missing = [n for n in layers if n not in available]
        if missing:
            raise FastDMError(f"unknown tap layers {missing}")
        self.layers = list(layers)
        self.modules = [backbone.key_module(n) for n in self.layers]

    def attach(self, sink: list) -> list:
        return [m.register_forward_hook(lambda _m, _i, o: sink.append(o)) for m in self.modules]

    @staticmethod
    def detach(handles: list) -> None:
        for h in handles:
            h.remove()


class KeyTaps:
    """Context manager recording the keys of ``layers`` during eager forwards inside it.

    ``take(num_frames)`` returns ``{layer: keys (B, F, N, C)}`` of the last forward and clears them.
    """

    def __init__(self, backbone: Backbone, layers: list[str]):
        self.backbone = backbone
        self.capture = KeyCapture(backbone, layers)
        self.layers = self.capture.layers
        self._handles: list = []
        self._keys: list[torch.Tensor] = []

    def __enter__(self) -> "KeyTaps":
        self._keys.clear()
        self._handles = self.capture.attach(self._keys)
        return self

    def __exit__(self, *exc) -> None:
        KeyCapture.detach(self._handles)
        self._handles = []

    def take(self, num_frames: int) -> dict[str, torch.Tensor]:
        if len(self._keys) != len(self.layers):
            raise RuntimeError(f"expected keys of {len(self.layers)} layers from one forward, got {len(self._keys)}")
        out = {n: self.backbone.keys_to_frames(k, num_frames) for n, k in zip(self.layers, self._keys)}
        self._keys.clear()
        return out


class DenoiserWithKeys(torch.nn.Module):
    """``(sample, timestep, text) -> (model output, *keys)`` of the backbone: the module engines
    compile or export. With ``grad_until``, autograd stops recording once that module has run
    (truncated backprop, as :meth:`Backbone.predict_noise`)."""

    def __init__(self, backbone: Backbone, layers: list[str], grad_until: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.denoiser = backbone.denoiser  # registered, so .eval() / parameters reach it
        self.capture = KeyCapture(backbone, layers)
        self.stop = backbone.denoiser.get_submodule(grad_until) if grad_until else None

    def forward(self, sample, timestep, text):
        keys: list[torch.Tensor] = []
        handles = self.capture.attach(keys)
        stop = attach_stop(self.stop)
        try:
            out = self.backbone.denoiser_forward(sample, timestep, text)
        finally:
            KeyCapture.detach(handles)
            detach_stop(stop)
        return (out, *keys)
