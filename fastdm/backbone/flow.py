"""What the flow-matching video backbones share (Wan, LTX-Video): the scheduler's timestep shift, the
noise level of an integer timestep, the causal video VAE's frame rule, a T5 tokenizer built without
downloads, and the dtype cast that keeps a model's fp32 modules in fp32.

fastdm's integer timestep ``t`` in ``[0, T)`` is a position on the scheduler's own schedule: ``u = t / T``,
shifted as the scheduler shifts it, ``s = shift u / (1 + (shift - 1) u)``; ``x_t = (1 - s) x + s e`` and the
transformer is fed ``s T``, exactly what the diffusers sampler feeds it at noise level ``s``. The
transformer predicts the velocity ``v = e - x``; :meth:`Backbone.to_noise_prediction` turns it into a
noise prediction.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from ..errors import FastDMError

def flow_shift(scheduler) -> float:
    """The timestep shift of a flow-matching scheduler (1.0 = none); refuses schedulers that are
    not flow matching or that shift by resolution at run time."""
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        raise FastDMError(f"{type(scheduler).__name__} uses dynamic (resolution-dependent) shifting, which fastdm does not "
                          "model; set use_dynamic_shifting false and a fixed shift in scheduler/scheduler_config.json")
    if "use_flow_sigmas" in cfg:  # UniPC / DPM-Solver with flow sigmas
        if not cfg.get("use_flow_sigmas") or cfg.get("prediction_type") != "flow_prediction":
            raise FastDMError(f"{type(scheduler).__name__} is not configured for flow matching (use_flow_sigmas true and "
                              "prediction_type flow_prediction); this transformer predicts flow velocities")
        return float(cfg.get("flow_shift", 1.0) or 1.0)
    if "shift" in cfg:  # FlowMatchEulerDiscreteScheduler
        if cfg.get("shift_terminal"):
            raise FastDMError(f"{type(scheduler).__name__} stretches its schedule to end at shift_terminal="
                              f"{cfg.get('shift_terminal')}, which depends on the step count of a sampling run and has no "
                              "single noise level per timestep; fastdm does not model it (LTX-Video 0.9.0/0.9.1 use it; "
                              "0.9.5 and later do not)")
        return float(cfg.get("shift", 1.0) or 1.0)
    raise FastDMError(f"{type(scheduler).__name__} is not a flow-matching scheduler; a flow-matching video model needs "
                      "UniPCMultistepScheduler (use_flow_sigmas) or FlowMatchEulerDiscreteScheduler")


def shifted_sigma(u, shift: float):
    """``s = shift u / (1 + (shift - 1) u)`` (works on floats and tensors)."""
    return shift * u / (1 + (shift - 1) * u)


def clean_prompt(prompt: str) -> str:
    return " ".join(prompt.split())


def write_t5_tokenizer(folder: str | Path, words, max_length: int = 16) -> None:
    """A real ``T5TokenizerFast`` (SentencePiece-style Unigram model, built here without downloads):
    one piece per word of ``words``, characters as the fallback; for tiny Wan models."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w.lower(), -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                          model_max_length=max_length)
    tok.save_pretrained(str(folder))


def cast_module(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device`` and its floating tensors to ``dtype``, except those named by the
    class's ``_keep_in_fp32_modules``, which stay fp32 as diffusers' ``from_pretrained(torch_dtype=...)``
    keeps them (Wan: rope, time embedder, modulation tables, norms). Tensor by tensor, so diffusers'
    warning about casting with ``.to()`` does not apply."""
    module.to(device=device)
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, sub in module.named_modules():
        for table in (sub._parameters, sub._buffers):
            for tname, t in table.items():
                if t is None or not t.is_floating_point():
                    continue
                full = f"{name}.{tname}" if name else tname
                want = torch.float32 if keep.intersection(full.split(".")) else dtype
                if t.dtype != want:
                    table[tname] = (torch.nn.Parameter(t.detach().to(want), requires_grad=False)
                                    if isinstance(t, torch.nn.Parameter) else t.to(want))
    return module



def latent_frames(num_frames: int, k: int) -> int:
    """Latent frames of a ``num_frames`` video under a causal VAE compressing ``k`` frames into one (frame 0 alone)."""
    return (num_frames - 1) // k + 1


def causal_frame_problem(num_frames: int, k: int, model: str) -> str | None:
    """Why a causal ``k``-frame VAE cannot take ``num_frames`` frames (it takes ``k``j+1), or None."""
    if k > 1 and (num_frames - 1) % k:
        fit = (num_frames - 1) // k * k + 1
        return (f"{model}'s VAE takes {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ...) and the video has {num_frames}; "
                f"pass `frames={fit}`")
    return None


def causal_video_range(start: int, stop: int, k: int) -> tuple[int, int]:
    """Video frames of latent frames ``[start, stop)``: latent 0 holds frame 0, latent j >= 1 frames kj-k+1..kj."""
    return (0 if start == 0 else k * start - k + 1), k * (stop - 1) + 1


def causal_mask_frames(mask: torch.Tensor, k: int) -> torch.Tensor:
    """A per-frame mask ``(F, ...)`` -> per latent frame; a latent cell is editable when any of its frames is."""
    if k == 1:
        return mask
    rest = mask[1:].reshape(-1, k, *mask.shape[1:]).amax(1)
    return torch.cat([mask[:1], rest])


class FlowNoise:
    """Mixin: the noise of a flow-matching backbone with ``shift`` and ``num_train_timesteps`` (see the module doc)."""

    def sigma(self, t) -> float:
        """Noise level ``s`` of integer timestep ``t``."""
        return float(shifted_sigma(t / self.num_train_timesteps, self.shift))

    def noise_coefficients(self, t: int) -> tuple[float, float]:
        s = self.sigma(t)
        return 1.0 - s, s

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The DDPM alpha_bar with the same signal-to-noise ratio as each flow level:
        ``(1 - s)^2 / ((1 - s)^2 + s^2)`` (x_t / sqrt((1-s)^2 + s^2) is that DDPM's x_t)."""
        if getattr(self, "_abar", None) is None:
            s = shifted_sigma(torch.arange(self.num_train_timesteps, dtype=torch.float64) / self.num_train_timesteps, self.shift)
            self._abar = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
        return self._abar

