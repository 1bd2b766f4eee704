"""Feature taps: capture attention keys (``to_k`` outputs) of chosen self-attention layers.

A forward hook on each chosen layer's ``to_k`` projection records its output as it is computed,
so the model's output is unchanged and no extra work is done; the recorded keys keep their
autograd graph when the forward runs with grad enabled. S-SSM uses the keys per frame, T-SSM
the same keys averaged over space.

Layer choice: glob patterns over qualified module names (``fnmatch``), e.g.
``"up_blocks.1.attentions.*.transformer_blocks.*.attn1"``; ``None`` = the backbone's default.
"""

from __future__ import annotations

import fnmatch

import torch

from .backbone.base import Backbone
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


class KeyTaps:
    """Context manager recording ``to_k`` outputs of ``layers`` during forwards inside it.

    ``take(num_frames)`` returns ``{layer: keys (B, F, N, C)}`` of the last forward and clears them.
    """

    def __init__(self, backbone: Backbone, layers: list[str]):
        modules = backbone.spatial_self_attention_layers()
        missing = [n for n in layers if n not in modules]
        if missing:
            raise FastDMError(f"unknown tap layers {missing}")
        self.layers = list(layers)
        self._modules = [modules[n] for n in self.layers]
        self._handles: list = []
        self._keys: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "KeyTaps":
        for name, module in zip(self.layers, self._modules):
            self._handles.append(module.to_k.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._keys[name] = output

        return hook

    def take(self, num_frames: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layers:
            if name not in self._keys:
                raise RuntimeError(f"layer {name} was not run inside the tap")
            k = self._keys.pop(name)  # (B*F, N, C), batch-major as UNet3D lays frames out
            out[name] = k.reshape(-1, num_frames, *k.shape[1:])
        return out
