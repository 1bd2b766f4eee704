"""The automatic edit mask (``--mask auto``): where the edit belongs, from the frozen model's own
cross-attention on the source video.

1. **Which words.** :func:`changed_words` aligns the source and target prompts word by word
   (``difflib``): the words replaced or removed in the source and replaced or added in the
   target are the edit's words ("a red circle" -> "a blue circle": "red" and "blue"; a shape
   swap: both shape words). :meth:`Backbone.word_token_positions` maps them to token positions.
2. **Where they attend.** The source video is noised at a few timesteps (one noise, its own
   seed) and run once per timestep through the denoiser with the source and the target prompt
   as a batch of two (no grad). In every cross-attention layer the softmax attention of the video
   tokens to the edit's tokens is recomputed from the captured queries and keys (the attention
   itself runs fused and never materializes it), summed over those tokens and averaged over
   heads; the per-frame maps are upsampled to the frame size and averaged over layers,
   timesteps and the two prompts.
3. **Mask.** The map is smoothed in time (weights 1/4, 1/2, 1/4 over neighbouring frames),
   normalized per frame to [0, 1], thresholded by Otsu's rule over the whole clip, and dilated by
   a margin (a fraction of the shorter side) so a new shape has room. A map without contrast
   (its top percentile barely above its median) or prompts that differ in no word give no mask,
   with the reason.

The cost is ``len(timesteps)`` denoiser calls at batch 2 before the edit (the report has the
seconds). The defaults (timesteps, rule, margin) are the ones measured on the shapes suite:
``benchmarks/quality.py --mask-iou``.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .backbone.base import Backbone

# What fastdm-edit does when neither --mask nor --boxes is given: "auto" or "none", set by the
# quality suite's mask table (benchmarks/results/quality-*.md, "Mask axis").
DEFAULT_MODE = "auto"
# Fractions of the model's training timesteps at which the maps are taken (measured: see module doc).
TIMESTEP_FRACTIONS = (0.5,)
MARGIN = 0.04  # dilation, as a fraction of the frame's shorter side
MAX_FOREGROUND = 0.30  # more of the clip above Otsu's threshold than this: the map marks no distinct region


def _words(prompt: str) -> list[str]:
    return [re.sub(r"[^\w-]", "", w.lower()) for w in prompt.split()]


def changed_words(source: str, target: str) -> tuple[list[int], list[int]]:
    """Indices of the words that differ: ``(in the source prompt, in the target prompt)``.

    Replaced words count on both sides, removed words on the source side, added words on the
    target side; case and punctuation are ignored.
    """
    a, b = _words(source), _words(target)
    src, tgt = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            src.extend(range(i1, i2))
        if tag in ("replace", "insert"):
            tgt.extend(range(j1, j2))
    return src, tgt


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximizes the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


@dataclass
class AutoMask:
    """The estimated mask and how it was made."""

    mask: np.ndarray | None  # (F, H, W) float32 of 0/1, 1 = editable; None: no mask (see fallback)
    heat: np.ndarray | None  # (F, H, W) float32 in [0, 1]: the smoothed, normalized attention map
    words: dict = field(default_factory=dict)  # {"source": [...], "target": [...]} the edit's words
    tokens: dict = field(default_factory=dict)  # {"source": [positions], "target": [positions]}
    threshold: float | None = None
    foreground: float | None = None  # fraction of the clip above the threshold, before dilation
    layers: list[str] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    denoiser_calls: int = 0
    seconds: float = 0.0
    fallback: str | None = None  # why there is no mask

    def report(self) -> dict:
        out = {"words": self.words, "tokens": self.tokens, "layers": self.layers, "timesteps": self.timesteps,
               "threshold": None if self.threshold is None else round(self.threshold, 4),
               "foreground": None if self.foreground is None else round(self.foreground, 4),
               "denoiser_calls": self.denoiser_calls, "batch": 2, "seconds": round(self.seconds, 4),
               "fallback": self.fallback}
        if self.mask is not None:
            out["area_fraction"] = round(float(self.mask.mean()), 4)
        return out


def graded_mask(result: "AutoMask", power: float) -> np.ndarray | None:
    """The mask graded by the map it came from: ``min(1, heat / threshold) ** power`` inside it, 0 outside
    ((F, H, W) float32; ``power`` 0: the binary mask). None where there is no mask."""
    if result.mask is None:
        return None
    if power <= 0:
        return result.mask
    grade = np.clip(result.heat / max(result.threshold, 1e-12), 0.0, 1.0) ** power
    return (grade * result.mask).astype(np.float32)


class _CrossAttentionMaps:
    """Hooks on the query and key modules of cross-attention layers; after a forward of a batch
    whose item ``b`` should look at token positions ``positions[b]``, :attr:`maps` holds per layer
    ``(B, F, N)``: the attention of each video token to those tokens (summed), averaged over heads."""

    def __init__(self, backbone: Backbone, layers: dict, positions: list[list[int]], num_frames: int,
                 key_mask: torch.Tensor | None = None):
        self.backbone, self.layers, self.positions, self.num_frames = backbone, layers, positions, num_frames
        self.key_mask = key_mask  # (B, L) bool: the text positions the model attends to (None: all)
        self.maps: dict[str, torch.Tensor] = {}
        self._q: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, ca in self.layers.items():
            self._handles.append(ca.query.register_forward_hook(lambda _m, _i, o, n=name: self._q.__setitem__(n, o)))
            self._handles.append(ca.key.register_forward_hook(lambda _m, _i, o, n=name: self._on_key(n, o)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_key(self, name: str, k: torch.Tensor) -> None:
        ca = self.layers[name]
        q = self.backbone.keys_to_frames(self._q.pop(name), self.num_frames).float()  # (B, F, N, C)
        b = q.shape[0]
        k = k.float().reshape(b, -1, *k.shape[-2:])[:, 0]  # (B, L, C): the text keys (repeated per frame in UNet3D)
        h = ca.heads
        q = q.reshape(*q.shape[:3], h, -1)
        k = k.reshape(b, k.shape[1], h, -1)
        logits = torch.einsum("bfnhd,blhd->bfhnl", q, k).mul_(ca.scale)  # (B, F, H, N, L)
        if self.key_mask is not None:  # padding the model masks out gets no share of the softmax here either
            logits.masked_fill_(~self.key_mask.to(logits.device)[:, None, None, None, :], float("-inf"))
        probs = logits.softmax(-1)
        maps = []
        for i in range(b):
            pos = self.positions[i]
            maps.append(probs[i, ..., pos].sum(-1).mean(1) if pos else torch.zeros_like(probs[i, :, 0, :, 0]))
        self.maps[name] = torch.stack(maps)  # (B, F, N)


def _grid(n: int, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) of ``n`` tokens laid over an ``h`` x ``w`` working grid."""
    d = (h * w / n) ** 0.5
    gh, gw = round(h / d), round(w / d)
    if gh * gw != n:
        raise RuntimeError(f"cannot lay {n} tokens over a {h}x{w} grid")
    return gh, gw


@torch.no_grad()
def estimate_mask(backbone: Backbone, x_src: torch.Tensor, text: torch.Tensor, source_prompt: str, target_prompt: str,
                  size: tuple[int, int], *, seed: int = 0, timestep_fractions=TIMESTEP_FRACTIONS, margin: float = MARGIN,
                  max_foreground: float = MAX_FOREGROUND, layers: list[str] | None = None,
                  prompts: str = "both", num_frames: int | None = None, window: int | None = None) -> AutoMask:
    """The automatic mask of the source working tensor ``x_src`` (1, C, F, h, w) for an edit from
    ``source_prompt`` to ``target_prompt``; ``text`` holds their embeddings ``(2, L, D)`` (source
    first); ``size`` = (W, H) and ``num_frames`` (default: the working tensor's) of the frames; maps
    of a model that compresses time (Wan's latent frames) are interpolated to the frames. A clip
    longer than ``window`` working frames is read window by window (consecutive windows, the last
    one ending at the clip's end), so the model never sees more frames than in an edit; the maps
    are thresholded together. See the module docstring for the method."""
    t0 = time.perf_counter()
    si, ti = changed_words(source_prompt, target_prompt)
    sw, tw = source_prompt.split(), target_prompt.split()
    result = AutoMask(None, None, words={"source": [sw[i] for i in si], "target": [tw[i] for i in ti]})
    s_pos, t_pos = (backbone.word_token_positions(p) if idx else [] for p, idx in ((source_prompt, si), (target_prompt, ti)))
    sp = sorted({p for i in si for p in s_pos[i]})
    tp = sorted({p for i in ti for p in t_pos[i]})
    result.tokens = {"source": sp, "target": tp}
    available = backbone.cross_attention_layers()
    chosen = {n: available[n] for n in (layers or available)}
    result.layers = list(chosen)
    if not si and not ti:
        result.fallback = "the source and target prompts differ in no word, so there is nothing to locate"
    elif not sp and not tp:
        result.fallback = "the words that differ fall past the text encoder's token limit"
    elif not chosen:
        result.fallback = f"{type(backbone).__name__} has no cross-attention layers to read"
    if result.fallback:
        result.seconds = time.perf_counter() - t0
        return result

    _, _, _, h, w = x_src.shape
    nf = num_frames or x_src.shape[2]
    W, H = size
    gen = torch.Generator("cpu").manual_seed(seed + 7919)  # its own stream: the edit's noise is unchanged
    noise = torch.randn(x_src.shape, generator=gen).to(x_src.device)
    total = torch.zeros(nf, H, W)
    # the prompts whose maps count: both by default; one alone only where it has edit words
    used = [i for i, pos in enumerate((sp, tp)) if pos and (prompts == "both" or i == (prompts == "target"))]
    used = used or [i for i, pos in enumerate((sp, tp)) if pos]
    T = backbone.info.num_train_timesteps
    key_mask = backbone.text_key_mask(text)
    fw = x_src.shape[2]
    n = fw if not window or window >= fw else window
    starts = sorted({min(s, fw - n) for s in range(0, fw, n)})
    for frac in timestep_fractions:
        t = min(T - 1, max(0, int(round(frac * T))))
        a, b = backbone.noise_coefficients(t)
        result.timesteps.append(t)
        if n == fw:  # the whole clip in one call (the form every clip had before windows)
            x_t = (a * x_src + b * noise).expand(2, *x_src.shape[1:])
            with _CrossAttentionMaps(backbone, chosen, [sp, tp], nf, key_mask) as cap:
                backbone.predict_noise(x_t, t, text)
            result.denoiser_calls += 1
            for m in cap.maps.values():
                gh, gw = _grid(m.shape[-1], h, w)
                grid = m.reshape(2, 1, m.shape[1], gh, gw).float().cpu()  # (B, 1, F', gh, gw)
                up = F.interpolate(grid, size=(nf, H, W), mode="trilinear", align_corners=False)[:, 0]
                total += up[used].mean(0)
            continue
        acc, count = torch.zeros(nf, H, W), torch.zeros(nf, 1, 1)
        for s in starts:  # window by window; frames two windows share get the mean of both
            v0, v1 = backbone.working_to_video_range(s, s + n)
            x_t = (a * x_src[:, :, s:s + n] + b * noise[:, :, s:s + n]).expand(2, -1, -1, -1, -1)
            with _CrossAttentionMaps(backbone, chosen, [sp, tp], v1 - v0, key_mask) as cap:
                backbone.predict_noise(x_t, t, text)
            result.denoiser_calls += 1
            for m in cap.maps.values():
                gh, gw = _grid(m.shape[-1], h, w)
                grid = m.reshape(2, 1, m.shape[1], gh, gw).float().cpu()
                up = F.interpolate(grid, size=(v1 - v0, H, W), mode="trilinear", align_corners=False)[:, 0]
                acc[v0:v1] += up[used].mean(0)
            count[v0:v1] += 1
        total += acc / count
    heat = total / (len(chosen) * len(timestep_fractions))
    if nf > 2:  # temporal smoothing 1/4, 1/2, 1/4 (edges replicated)
        padded = torch.cat([heat[:1], heat, heat[-1:]])
        heat = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    lo = heat.flatten(1).min(1).values[:, None, None]
    hi = heat.flatten(1).max(1).values[:, None, None]
    heat = (heat - lo) / (hi - lo).clamp_min(1e-12)
    result.threshold = otsu_threshold(heat.numpy().ravel())
    mask = (heat > result.threshold).float()
    result.foreground = float(mask.mean())
    if result.foreground > max_foreground:
        result.fallback = (f"the cross-attention map of the words {result.words['source'] + result.words['target']} marks no "
                           f"distinct region ({result.foreground:.0%} of the clip above its threshold, more than "
                           f"{max_foreground:.0%}), so it shows no object")
        result.seconds = time.perf_counter() - t0
        return result
    r = max(1, int(round(margin * min(H, W)))) if margin > 0 else 0  # a positive margin grows by 1 px at least
    if r:
        mask = F.max_pool2d(mask[:, None], kernel_size=2 * r + 1, stride=1, padding=r)[:, 0]
    result.mask = mask.numpy().astype(np.float32)
    result.heat = heat.numpy().astype(np.float32)
    result.seconds = time.perf_counter() - t0
    return result
