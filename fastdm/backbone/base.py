"""The backbone protocol: everything the driver, taps, engines, budget and benchmarks may use.

The optimizer driver only talks to this interface; diffusers/transformers classes stay inside
the concrete backbone files (``unet3d.py`` for ``UNet3DConditionModel``, ``wan.py`` for Wan 2.1's
``WanTransformer3DModel``). A backbone says:

* **working space** (:meth:`to_working`, :meth:`from_working`, :meth:`working_shape`,
  :attr:`valid_range`): the tensor the edit optimizes, ``(B, C, F, h, w)`` fp32 — VAE latents
  (times the VAE scaling factor) for latent models, pixels in [-1, 1] for pixel-space models;
* **noising** (:meth:`noise_coefficients`): ``x_t = a(t) x + b(t) e`` — DDPM
  ``(sqrt(abar), sqrt(1 - abar))``; a flow-matching model ``(1 - s, s)``;
* **prediction** (:attr:`BackboneInfo.prediction_type`, :meth:`denoiser_forward`,
  :meth:`to_noise_prediction`): the raw model output and its conversion to a noise prediction,
  so V-DDS is written once, on noise predictions;
* **text** (:meth:`encode_prompts`, :meth:`text_embedding_shape`, :meth:`release_text_encoder`);
* **cross-attention** (:meth:`cross_attention_layers`, :meth:`word_token_positions`): where the
  automatic mask (:mod:`fastdm.automask`) reads which video tokens attend to which prompt words;
* **taps**: which self-attention layers exist (:meth:`spatial_self_attention_layers`), the
  default ones, the module whose output *is* the keys (:meth:`key_module`: the key-capture point)
  and how its token layout maps to ``(batch, frames, tokens per frame, channels)``
  (:meth:`keys_to_frames`);
* **memory** (:meth:`modules`, :meth:`block_checkpointing`, :meth:`vae_tiling`) and an identity
  for engine caches (:meth:`identity`).

:meth:`predict_noise` and :class:`fastdm.taps.DenoiserWithKeys` are the only two callers of
:meth:`denoiser_forward`; truncated backprop is wired once, in :func:`truncate_after`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import FastDMError


def stop_recording(*_) -> None:
    """Forward hook for truncated backprop: autograd stops recording once the hooked module has
    run (returns None, so the module's output is left as it is). The caller re-enables grad."""
    torch.set_grad_enabled(False)


def attach_stop(module: torch.nn.Module | None):
    """Register :func:`stop_recording` on ``module`` (None: nothing); returns the handle or None.
    Written as plain calls (not a context manager) so torch.compile and torch.export trace it."""
    return None if module is None else module.register_forward_hook(stop_recording)


def detach_stop(handle) -> None:
    if handle is not None:
        handle.remove()
        torch.set_grad_enabled(True)


@contextlib.contextmanager
def truncate_after(module: torch.nn.Module | None):
    """Autograd records until ``module`` has run, then stops (truncated backprop); None: no-op."""
    handle = attach_stop(module)
    try:
        yield
    finally:
        detach_stop(handle)


@contextlib.contextmanager
def checkpoint_forwards(units):
    """Gradient checkpointing of ``units`` (modules) within the block: while grad is enabled each
    unit's ``forward`` runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), so its
    activations are recomputed in the backward instead of kept. The forwards are swapped on entry
    and restored on exit (an instance attribute set before is put back, none is left otherwise), so
    nothing outlives the call. Backbones choose the units (``block_checkpointing``)."""
    units = list(units)
    saved = [unit.__dict__.get("forward") for unit in units]
    for unit in units:
        original = unit.forward

        def fwd(*args, _f=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)
            return _f(*args, **kwargs)

        unit.forward = fwd
    try:
        yield
    finally:
        for unit, old in zip(units, saved):
            if old is None:
                del unit.forward
            else:
                unit.forward = old


@contextlib.contextmanager
def tiled_vae(vae, enabled: bool):
    """``vae`` (a diffusers autoencoder, or None) encodes and decodes tile by tile within the block;
    nothing when not ``enabled``, no VAE, or tiling is already on (then it is left on)."""
    if vae is None or not enabled or getattr(vae, "use_tiling", False):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


@dataclass(frozen=True)
class CrossAttention:
    """One cross-attention layer as the automatic mask reads it: the modules whose outputs are
    the queries (video tokens) and the keys (text tokens), after any q/k normalization and
    before any positional rotation, the head count and the softmax scale."""

    query: torch.nn.Module
    key: torch.nn.Module
    heads: int
    scale: float


def word_token_positions(tokenizer, prompt: str, max_length: int) -> list[list[int]]:
    """Token positions of each whitespace-separated word of ``prompt`` in its tokenization.

    Tokenizes growing prefixes (``"a"``, ``"a red"``, ...) with the special tokens the encoder
    sees, so it works for tokenizers with a start token (CLIP) and without (T5): the empty
    prompt's tokens that also start the first word's tokenization are the leading specials,
    the rest trail the words. Positions at or past
    ``max_length`` (truncated away) are dropped.
    """
    words = prompt.split()

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=True, truncation=False).input_ids)

    empty = ids("")  # the special tokens alone: those before the words (start) and after (end)
    first = ids(words[0]) if words else empty
    lead = 0
    while lead < min(len(empty), len(first)) and empty[lead] == first[lead]:
        lead += 1
    tail = len(empty) - lead
    out, prev = [], lead
    for k in range(1, len(words) + 1):
        end = len(ids(" ".join(words[:k]))) - tail
        out.append([i for i in range(prev, end) if i < max_length])
        prev = end
    return out


@dataclass(frozen=True)
class BackboneInfo:
    name: str  # class name of the denoiser
    space: str  # "latent" or "pixel"
    path: str  # folder it was loaded from
    native_size: tuple[int, int]  # (width, height) in pixels
    size_multiple: int  # input width/height must be multiples of this
    spatial_factor: int  # pixels per working-space cell (VAE factor; 1 in pixel space)
    num_train_timesteps: int
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "flow" (velocity e - x)


class Backbone(abc.ABC):
    info: BackboneInfo
    device: torch.device
    dtype: torch.dtype  # weights' dtype; the edited tensor stays fp32
    # A guidance-distilled denoiser (HunyuanVideo) takes the guidance scale as an input: one pass per prompt is
    # already the guided prediction, so a step evaluates (edited, target) and (source, source) only, with the
    # scale set in ``embedded_guidance`` before the calls; no unconditional branch.
    guidance_distilled: bool = False
    embedded_guidance: float = 1.0
    # The family's fallback edit settings (its pipeline's documented defaults), beneath a model folder's measured
    # ``fastdm.json`` ``defaults`` and the user's settings (:func:`fastdm.driver.config.resolve_config`).
    edit_defaults: dict = {}

    # -- noising ------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar(t) for t = 0..T-1 as a float64 CPU tensor (DDPM-family backbones)."""

    def noise_coefficients(self, t: int) -> tuple[float, float]:
        """``(a, b)`` with ``x_t = a x + b e`` at integer timestep ``t``."""
        abar = float(self.alphas_cumprod[t])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    @property
    def valid_range(self) -> tuple[float, float] | None:
        """Range the edited working tensor is kept in (pixels: [-1, 1]); None when unbounded."""
        return (-1.0, 1.0) if self.info.space == "pixel" else None

    # -- text ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``(len(prompts), L, D)`` on the backbone's device and dtype."""

    @abc.abstractmethod
    def text_embedding_shape(self) -> tuple[int, int]:
        """``(L, D)`` of one prompt's embedding (engines export with it)."""

    @abc.abstractmethod
    def release_text_encoder(self) -> None:
        """Free the text encoder (prompts are encoded once and cached by the pipeline)."""

    # -- working space ------------------------------------------------------------------------
    @abc.abstractmethod
    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(F, 3, H, W)`` in [-1, 1] -> working tensor ``(1, C, F, h, w)`` fp32."""

    @abc.abstractmethod
    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        """Working tensor ``(1, C, F, h, w)`` -> frames ``(F, 3, H, W)`` in [-1, 1], fp32 on CPU."""

    @abc.abstractmethod
    def working_shape(self, num_frames: int, size: tuple[int, int]) -> tuple[int, ...]:
        """Shape ``(1, C, F, h, w)`` of the working tensor for ``num_frames`` frames of ``size`` = (W, H)."""

    def frame_count_problem(self, num_frames: int) -> str | None:
        """Why this backbone cannot take a ``num_frames``-frame video (one line), or None.
        Default: any count (Wan's VAE needs 4k+1 frames)."""
        return None

    def working_to_video_range(self, start: int, stop: int) -> tuple[int, int]:
        """The video frames ``[v0, v1)`` that working frames ``[start, stop)`` hold (default: the same)."""
        return start, stop

    def native_frames(self) -> int:
        """Working frames the denoiser was trained on: the default edit window (``fastdm.json``'s
        ``frames`` where the folder has one, else the family's documented length)."""
        return int(getattr(self, "_native_frames", None) or self.default_window)

    default_window = 24  # UNet3D text-to-video (ZeroScope v2 576w: 24 frames; ModelScope 16)

    def mask_frames_to_working(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask ``(F, ...)`` per video frame -> per working-space frame (default: the same frames;
        a VAE that compresses time pools the frames of each latent frame)."""
        return mask

    # -- denoiser -----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The frozen denoiser module (layer names in :meth:`spatial_self_attention_layers` are relative to it)."""

    @abc.abstractmethod
    def denoiser_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Raw model output for ``sample`` (in the weights' dtype) at ``timestep`` (a (B,) tensor)."""

    def to_noise_prediction(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Convert the raw output to a noise prediction (fp32)."""
        kind = self.info.prediction_type
        out = out.float()
        if kind == "epsilon":
            return out
        a, b = self.noise_coefficients(t)
        if kind == "v_prediction":  # v = a e - b x  =>  e = a v + b x_t
            return a * out + b * x_t.float()
        if kind == "flow":  # x_t = (1 - s) x + s e, v = e - x  =>  e = x_t + (1 - s) v
            return x_t.float() + a * out
        raise FastDMError(f"unknown prediction type {kind!r}")

    def predict_noise(self, x_t: torch.Tensor, t: int, text: torch.Tensor, grad_until: str | None = None) -> torch.Tensor:
        """Noise prediction for a batch ``x_t (B, C, F, h, w)`` with text embeddings ``(B, L, D)``.

        ``grad_until``: name of a module after which autograd stops recording (truncated backprop);
        the output then carries no graph.
        """
        timestep = torch.full((x_t.shape[0],), t, device=self.device, dtype=torch.long)
        stop = self.denoiser.get_submodule(grad_until) if grad_until and torch.is_grad_enabled() else None
        with truncate_after(stop):
            out = self.denoiser_forward(x_t.to(self.dtype), timestep, text)
        return self.to_noise_prediction(out, x_t, t)

    # -- taps ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def spatial_self_attention_layers(self) -> dict[str, torch.nn.Module]:
        """Self-attention modules whose keys can be tapped, by qualified name, in forward order."""

    @abc.abstractmethod
    def default_tap_layers(self) -> list[str]:
        """Names of the layers whose keys S-SSM/T-SSM use by default."""

    def key_module(self, layer: str) -> torch.nn.Module:
        """The module whose forward output is the layer's keys (the key-capture point)."""
        return self.spatial_self_attention_layers()[layer].to_k

    def keys_to_frames(self, keys: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Captured keys -> ``(B, F, N, C)``. Default: UNet3D's ``(B*F, N, C)``, batch-major."""
        return keys.reshape(-1, num_frames, *keys.shape[1:])

    def cross_attention_layers(self) -> dict[str, CrossAttention]:
        """Cross-attention layers (video tokens attending to text) by qualified name, in forward
        order; their queries map to frames with :meth:`keys_to_frames`. Default: none."""
        return {}

    def text_key_mask(self, text: torch.Tensor) -> torch.Tensor | None:
        """``(B, L)`` bool: the text positions of ``text`` (as :meth:`predict_noise` takes it) that the model's
        cross-attention attends to, where it masks padding; None where it attends to every position (the
        automatic mask's softmax then runs over all of them too). Default: None."""
        return None

    def word_token_positions(self, prompt: str) -> list[list[int]]:
        """Token positions of each word of ``prompt`` in the text embedding (automatic mask)."""
        raise FastDMError(f"{type(self).__name__} cannot map prompt words to tokens; give `mask` or `boxes`")

    # -- memory and identity --------------------------------------------------------------------
    @abc.abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded modules that hold weights now (released ones are absent)."""

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules().values() for t in [*m.parameters(), *m.buffers()])

    def identity(self) -> str:
        """A string naming these exact weights, dtype and device (engine cache keys)."""
        h = hashlib.sha256(f"{self.info.path}|{self.info.name}|{self.dtype}|{self.device.type}".encode())
        for n, p in list(self.denoiser.named_parameters())[:4]:
            h.update(f"{n}:{tuple(p.shape)}".encode())
            if p.device.type != "meta":
                h.update(f"{float(p.detach().float().abs().sum()):.6e}".encode())
        return h.hexdigest()[:20]

    @contextlib.contextmanager
    def block_checkpointing(self, enabled: bool):
        """Within the block: recompute block activations in the backward (optional; default: no-op)."""
        yield

    @contextlib.contextmanager
    def vae_tiling(self, enabled: bool):
        """Within the block: encode/decode latents tile by tile (latent models; default: no-op)."""
        yield

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Backbone":
        raise FastDMError(f"{type(self).__name__} cannot be moved; load it again with the device and dtype you need")

    def engine_problem(self) -> str | None:
        """Why no traced engine (compile, ONNX, TensorRT) can run this denoiser, or None (default: they can)."""
        return None

    def guidance_at(self, t: int, guidance_scale: float, guidance_scale_2: float | None = None) -> float:
        """The classifier-free guidance scale at timestep ``t`` (default: ``guidance_scale`` everywhere;
        a two-expert model gives its low-noise expert ``guidance_scale_2``)."""
        return float(guidance_scale)

    def set_attention(self, kind: str) -> None:
        """Attention implementation: ``"sdpa"`` (PyTorch scaled-dot-product attention, the default)
        or ``"xformers"``; refuses with the reason when one is unavailable."""
        if kind != "sdpa":
            raise FastDMError(f"`attention={kind}`: {type(self).__name__} supports only sdpa")
