"""The stages after the edit, and the keyframe mapping.

Every stage takes and returns ``(F, H, W, 3)`` uint8 frames and uses the *target* prompt.

- ``interpolate``: K keyframes -> (K - 1) * factor + 1 frames. The edited keyframes keep their
  exact pixels and land on every ``factor``-th output frame; the frames between two keyframes are
  sampled conditioned on them (Show-1's form: UNet input [noisy, the keyframes linearly
  interpolated in time, a mask that is 1 on keyframes]), ``window`` keyframe intervals per call.
- ``upscale``: each frame upsampled (bilinear) to ``scale`` times the size, noise-augmented to
  ``noise_level`` on the folder's own schedule, concatenated on channels with the noisy high-res
  video; sampled with the folder's scheduler and classifier-free guidance in overlapping windows
  of ``window`` frames, ``stride`` apart; frames already made by the previous window (at least the
  first one) are carried over: replaced, at every step, by their finished values noised to the
  step's level, and kept as they were.
- ``refine``: a latent text-to-video model, video-to-video (resize to ``size``, noise to
  ``strength``, DDIM back with the prompt): :func:`fastdm.sampling.ddim_video_to_video`.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

from ..io.tensors import frames_to_tensor, tensor_to_frames
from ..errors import FastDMError
from .folders import IMAGE_CHANNELS, StageModel


# -- keyframes ---------------------------------------------------------------------------------
def keyframe_positions(n_input: int, n_keys: int | None) -> list[int]:
    """Positions (into the selected input frames) of the base stage's keyframes: evenly spaced,
    first and last included, ``round(k (N - 1) / (K - 1))``."""
    k = n_input if n_keys is None else n_keys
    if k > n_input:
        raise FastDMError(f"the edit stage takes {k} keyframes but the input gives {n_input} frames (after `frames`/`stride`); "
                          f"give a longer clip or lower the edit stage's 'frames'")
    if k == 1:
        return [0]
    return [round(i * (n_input - 1) / (k - 1)) for i in range(k)]


def output_fps(input_indices: list[int], fps: float, key_pos: list[int], n_out: int) -> float:
    """The output plays over the same time span as the keyframes it came from (first to last)."""
    span = (input_indices[key_pos[-1]] - input_indices[key_pos[0]]) / fps if fps else 0.0
    return float(fps) if n_out < 2 or span <= 0 else (n_out - 1) / span


def source_positions_at_output_times(input_indices: list[int], key_pos: list[int], n_out: int) -> list[int]:
    """Positions (into the selected input frames) of the input frame nearest in time to each output frame (for the
    side-by-side comparison)."""
    t0, t1 = input_indices[key_pos[0]], input_indices[key_pos[-1]]
    times = [t0 + (t1 - t0) * j / (n_out - 1) for j in range(n_out)] if n_out > 1 else [t0]
    idx = np.asarray(input_indices)
    return [int(np.argmin(np.abs(idx - t))) for t in times]


# -- the conditioned pixel sampler ---------------------------------------------------------------
def _step_kwargs(scheduler, gen) -> dict:
    params = inspect.signature(scheduler.step).parameters
    return {"generator": gen} if "generator" in params else {}


@torch.no_grad()
def sample_conditioned(model: StageModel, cond: torch.Tensor, text: torch.Tensor, *, steps: int, guidance_scale: float,
                       gen: torch.Generator, known: torch.Tensor | None = None, known_mask: list[bool] | None = None,
                       class_labels: int | None = None, init: torch.Tensor | None = None,
                       strength: float = 1.0) -> torch.Tensor:
    """Sample a pixel video ``(1, c, F, H, W)`` in [-1, 1] with the folder's scheduler and CFG; the UNet's
    input is ``[x_t, cond]`` on channels. ``known``/``known_mask``: frames whose values are given (replaced
    at every step by the value noised to that step's level, and in the result). ``text`` is
    ``[negative, prompt]``.

    ``init``: the best estimate of the result the stage already has (the upsampled or linearly
    interpolated clip); the chain starts from it noised to the first timestep, as the forward process
    would. Schedules whose last timestep keeps signal (DDIM's scaled-linear: sqrt(abar) = 0.07 at
    t = 951) were trained on x_T that still carries the clip's low frequencies, and a pure-noise start
    misses them: on the shapes upscale model it left noise in the background (PSNR against the true
    render 7.1 dB vs 22.3 dB from the noised estimate; the pure-noise row of
    ``benchmarks/results/upscale-settings-cpu-intel-xeon-2-50ghz-2core-x86_64.md``).
    With a zero-terminal-SNR schedule the two starts agree. A stage's ``"start": "noise"`` setting
    passes no ``init`` (Show-1's own sampling). ``strength`` < 1 keeps the last
    ``round(n * strength)`` of the n timesteps (img2img)."""
    sched, unet = model.scheduler, model.unet
    c = IMAGE_CHANNELS
    _, _, f, h, w = cond.shape
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength < 1.0:
        skip = len(timesteps) - max(1, round(len(timesteps) * strength))
        timesteps = timesteps[skip:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(skip)
    noise = torch.randn((1, c, f, h, w), generator=gen)
    if init is not None:
        x = sched.add_noise(init.float(), noise, timesteps[:1])
    else:
        x = noise * float(getattr(sched, "init_noise_sigma", 1.0))
    kw = _step_kwargs(sched, gen)
    fwd = {}
    if class_labels is not None and "class_labels" in inspect.signature(unet.forward).parameters \
            and getattr(unet, "class_embedding", None) is not None:  # Show-1 / IF: the noise-augmentation level
        fwd["class_labels"] = torch.tensor([class_labels] * 2, device=model.device)
    sel = [i for i, k in enumerate(known_mask or []) if k]
    cond = cond.to(model.device, model.dtype)
    for t in timesteps:
        if sel:
            noisy = sched.add_noise(known[:, :, sel], torch.randn(known[:, :, sel].shape, generator=gen), t.reshape(1))
            x[:, :, sel] = noisy
        xin = sched.scale_model_input(x, t).to(model.device, model.dtype)
        inp = torch.cat([xin, cond], 1)
        out = unet(torch.cat([inp, inp]), t.to(model.device), encoder_hidden_states=text, return_dict=False, **fwd)[0].float().cpu()
        u, p = out[:1], out[1:]
        e = u[:, :c] + guidance_scale * (p[:, :c] - u[:, :c])
        if out.shape[1] == 2 * c and model.info.learned_variance:
            e = torch.cat([e, p[:, c:]], 1)
        x = sched.step(e, t, x, **kw).prev_sample
    if sel:
        x[:, :, sel] = known[:, :, sel]
    return x.clamp(-1, 1)


def _text(model: StageModel, prompt: str, negative: str) -> torch.Tensor:
    return model.encode_prompts([negative, prompt])


def _video(frames: np.ndarray) -> torch.Tensor:
    return frames_to_tensor(frames).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)


def _frames(x: torch.Tensor) -> np.ndarray:
    return tensor_to_frames(x[0].permute(1, 0, 2, 3))


# -- stages --------------------------------------------------------------------------------------
def upscale_size(frames: np.ndarray, settings: dict) -> tuple[int, int]:
    h, w = frames.shape[1:3]
    if settings.get("size"):
        return tuple(settings["size"])
    return w * settings["scale"], h * settings["scale"]


def run_upscale(model: StageModel, frames: np.ndarray, prompt: str, settings: dict, on_window=None) -> np.ndarray:
    s = settings
    nf = frames.shape[0]
    tw, th = upscale_size(frames, s)
    n_train = len(model.scheduler.alphas_cumprod)
    if s["noise_level"] >= n_train:
        raise FastDMError(f"upscale stage: 'noise_level' {s['noise_level']} must be below the scheduler's {n_train} timesteps")
    gen = torch.Generator("cpu").manual_seed(s["seed"])
    lo = frames_to_tensor(frames)  # (F, 3, h, w)
    up = F.interpolate(lo, size=(th, tw), mode="bilinear", align_corners=False)
    init = up.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W): where the chain starts (noised)
    abar = float(model.scheduler.alphas_cumprod[s["noise_level"]])
    up = abar ** 0.5 * up + (1 - abar) ** 0.5 * torch.randn(up.shape, generator=gen)
    cond = up.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)
    text = _text(model, prompt, s["negative_prompt"])
    window = min(s["window"], nf)
    starts = list(range(0, nf - window + 1, s["stride"])) or [0]
    if starts[-1] + window < nf:
        starts.append(nf - window)
    out = torch.zeros(1, IMAGE_CHANNELS, nf, th, tw)
    done = [False] * nf
    for wi, a in enumerate(starts):
        b = a + window
        x = sample_conditioned(model, cond[:, :, a:b], text, steps=s["steps"], guidance_scale=s["guidance_scale"], gen=gen,
                               known=out[:, :, a:b], known_mask=done[a:b], class_labels=s["noise_level"],
                               init=init[:, :, a:b] if s["start"] == "estimate" else None, strength=s["strength"])
        out[:, :, a:b] = x
        done[a:b] = [True] * (b - a)
        if on_window:
            on_window(wi + 1, len(starts))
    return _frames(out)


def run_interpolate(model: StageModel, frames: np.ndarray, prompt: str, settings: dict, on_window=None) -> np.ndarray:
    s = settings
    k, fac = frames.shape[0], s["factor"]
    if k < 2:
        return frames.copy()
    gen = torch.Generator("cpu").manual_seed(s["seed"])
    keys = _video(frames)  # (1, 3, K, H, W)
    _, c, _, h, w = keys.shape
    n_out = (k - 1) * fac + 1
    out = torch.zeros(1, c, n_out, h, w)
    out[:, :, ::fac] = keys
    text = _text(model, prompt, s["negative_prompt"])
    spans = [(j, min(j + s["window"], k - 1)) for j in range(0, k - 1, s["window"])]
    for wi, (k0, k1) in enumerate(spans):
        n = (k1 - k0) * fac + 1
        pos = torch.arange(n, dtype=torch.float32) / fac  # position in keyframe units from k0
        lo = pos.floor().long().clamp(max=k1 - k0 - 1)
        frac = (pos - lo).view(1, 1, n, 1, 1)
        seg = keys[:, :, k0:k1 + 1]
        lin = seg[:, :, lo] * (1 - frac) + seg[:, :, lo + 1] * frac  # keyframes interpolated linearly in time
        mask = torch.zeros(1, 1, n, h, w)
        mask[:, :, ::fac] = 1.0
        known_mask = [i % fac == 0 for i in range(n)]
        a = k0 * fac
        x = sample_conditioned(model, torch.cat([lin, mask], 1), text, steps=s["steps"], guidance_scale=s["guidance_scale"],
                               gen=gen, known=out[:, :, a:a + n], known_mask=known_mask,
                               init=lin if s["start"] == "estimate" else None)
        out[:, :, a:a + n] = x
        out[:, :, ::fac] = keys  # the edited keyframes stay exactly as edited
        if on_window:
            on_window(wi + 1, len(spans))
    return _frames(out)


def run_refine(backbone, frames: np.ndarray, prompt: str, settings: dict) -> np.ndarray:
    from ..io import plan_crop, resize_crop
    from ..sampling import ddim_video_to_video

    s = settings
    if s.get("size"):
        w, h = s["size"]
        m = backbone.info.size_multiple
        if w % m or h % m:
            raise FastDMError(f"refine stage: 'size' {w}x{h} must be a multiple of {m} for its model")
        frames = resize_crop(frames, plan_crop((frames.shape[2], frames.shape[1]), (w, h)))
    return ddim_video_to_video(backbone, frames, prompt, strength=s["strength"], steps=s["steps"],
                               guidance_scale=s["guidance_scale"], seed=s["seed"], negative_prompt=s["negative_prompt"])


# -- Show-1's base UNet behind the edit's backbone ---------------------------------------------------
def showone_edit_backbone(model: StageModel, path: str, native_size):
    """A :class:`UNet3DBackbone` over a Show-1 (``showone``) base UNet: same module layout as diffusers'
    UNet3D; with a learned variance the first 3 output channels are the noise prediction."""
    from ..backbone.unet3d import UNet3DBackbone

    class ShowOneBackbone(UNet3DBackbone):
        def denoiser_forward(self, sample, timestep, text):
            out = super().denoiser_forward(sample, timestep, text)
            return out[:, : sample.shape[1]] if out.shape[1] == 2 * sample.shape[1] else out

        def encode_prompts(self, prompts):
            return StageModel.encode_prompts(self, prompts)

    bb = ShowOneBackbone(unet=model.unet, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                         scheduler=model.scheduler, vae=model.vae, path=path, native_size=native_size,
                         device=model.device, dtype=model.dtype)
    return bb
