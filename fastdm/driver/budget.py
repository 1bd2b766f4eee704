"""``--memory-budget``: run the fastest execution plan whose measured peak memory fits.

Candidates, fastest first: ``fast`` (the three no-grad evaluations in one batched call),
``fast-seq`` (one at a time) and ``lean`` (one at a time, UNet blocks gradient-checkpointed,
VAE tiled). Each is probed with one step on the real inputs — on a copy of the edited tensor, so
the edit itself is untouched — and its peak is measured, not guessed: CUDA max allocated on a
GPU (an out-of-memory probe counts as not fitting); on CPU the tensors live before the step
(weights, edited and source video) plus the allocator's peak during it (PyTorch profiler memory
events). The first plan that fits runs the edit; when none does, a one-line error gives the need.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import FastDMError
from .plan import FAST, FAST_SEQ, LEAN, ExecutionPlan

CANDIDATES = (FAST, FAST_SEQ, LEAN)


def parse_size(text: str) -> int:
    """'8G', '8GB', '512M', '8GiB' or a plain number of bytes -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise FastDMError(f"`memory_budget={text!r}` is not a size; write it like 8G or 512M") from None
    if value <= 0:
        raise FastDMError(f"`memory_budget` must be positive, got {text!r}")
    return int(value)


def trace_tensor_peak(prof) -> int:
    """Most CPU tensor bytes allocated at once during a profiled region, above its start."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    mem = [e["args"]["Total Allocated"] for e in events
           if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max([0, *mem])


def live_bytes(backbone, *tensors: torch.Tensor) -> int:
    """Bytes held before a step: the backbone's loaded weights plus ``tensors``."""
    return backbone.weight_bytes() + sum(t.numel() * t.element_size() for t in tensors)


def probe_peak(make_step, plan: ExecutionPlan, backbone, x: torch.Tensor, x_src: torch.Tensor) -> float:
    """Peak memory (bytes) of one step of ``plan``; ``inf`` if it ran out of memory."""
    step = make_step(plan)
    xp = torch.nn.Parameter(x.detach().clone())
    noise = torch.zeros_like(x_src)
    t = backbone.info.num_train_timesteps // 2
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(backbone.device)
        try:
            step(xp, x_src, t, noise)
            torch.cuda.synchronize(backbone.device)
        except torch.OutOfMemoryError:
            return float("inf")
        finally:
            del xp
        return float(torch.cuda.max_memory_allocated(backbone.device))
    base = live_bytes(backbone, x, x_src, xp)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(xp, x_src, t, noise)
    return float(base + trace_tensor_peak(prof))


def fit_plan(make_step, backbone, x: torch.Tensor, x_src: torch.Tensor, budget: int) -> tuple[ExecutionPlan, dict]:
    """The fastest candidate plan whose probed peak is within ``budget`` bytes, and every probe's figure."""
    probes: dict[str, float] = {}
    for plan in CANDIDATES:
        probes[plan.name] = probe_peak(make_step, plan, backbone, x, x_src)
        if probes[plan.name] <= budget:
            return plan, probes
    need = min(probes.values())
    need_s = "more than the GPU has" if need == float("inf") else f"{need / 2**30:.2f} GiB"
    raise FastDMError(f"`memory_budget` ({budget / 2**30:.2f} GiB) is too small: even the lean plan needs {need_s}; "
                      "use fewer `frames`, a smaller `size` or a larger budget")
